"""The comparison in the Runs tab through AppTest: what its table and image columns say, never raw errors."""
from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.panels import compare
from vae_core.lab import DatasetUnavailable, Lab, RunConfig


def _script(runs_dir, names):
    from dashboard.panels import compare
    from vae_core.lab import Lab

    compare.render(Lab(runs_dir), names)


@pytest.fixture
def parent_and_fork(tmp_path):
    """A finished run (evidence off, so it has no IWAE bound) and a fork of it, paused as early as it parks."""
    lab = Lab(tmp_path / "runs", num_threads=1, max_runs=4)
    cfg = RunConfig().replace(epochs=1, train_size=512, batch_size=64, hidden_dim=64, latent_dim=2, evidence_every=0)
    parent = lab.start(cfg, name="parent")
    parent.join(120)
    assert parent.status().state == "finished", parent.status().message
    child = lab.fork("parent", epochs=500, beta=4.0, name="child")
    lab.pause("child")
    deadline = time.monotonic() + 120
    while child.status().state != "paused" or child.weights_version() == 0:
        assert time.monotonic() < deadline, child.status()
        time.sleep(0.05)
    yield lab, child
    lab.stop("child", wait=10)
    lab.shutdown()


def test_a_fork_and_a_run_without_evidence_show_no_none(parent_and_fork):
    """Right after a fork the table read 'None' in every test column of the child, and any run trained without
    evidence had 'None' as its IWAE bound: a missing number is '–', explained under the table."""
    lab, child = parent_and_fork
    at = AppTest.from_function(_script, args=(lab.runs_dir, ["parent", "child"]), default_timeout=60).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    cells = table.to_dict("records")
    assert [c["Run"] for c in cells] == ["parent", "child"]
    assert all(v is not None and str(v) not in ("None", "nan") for c in cells for v in c.values()), cells
    assert cells[0]["Best IWAE bound"] == cells[1]["Best IWAE bound"] == compare.MISSING  # evidence was off
    assert cells[0]["Test ELBO"] != compare.MISSING and cells[0]["β"] == "1" and cells[1]["β"] == "4"
    if not any(r.get("split") == "test" for r in child.metrics()):  # parked before its first test epoch
        assert cells[1]["Test ELBO"] == cells[1]["Steps"] == compare.MISSING
    assert any(compare.MISSING in c.value for c in at.caption)


def test_problems_are_said_without_the_exceptions_text():
    """'No images: [Errno 2] No such file … checkpoint.pt' put a server path on the page."""
    missing = FileNotFoundError(2, "No such file or directory", "/srv/vae/runs/child/checkpoint.pt")
    said = compare.problem(missing)
    assert "/srv" not in said and "Errno" not in said and "checkpoint" in said
    assert "dataset" in compare.problem(DatasetUnavailable("mnist: not found in /home/someone/data"))
    assert "/home" not in compare.problem(DatasetUnavailable("mnist: not found in /home/someone/data"))
    assert "log" in compare.problem(ValueError("a bug"))


def test_table_cells_write_numbers_as_the_columns_say():
    cells = compare.table_cells({"Run": "a", "β": 0.25, "Steps": 1560, "Test ELBO": -91.234, "KL": float("nan"),
                                 "Active units": "2 / 2", "IWAE k": None})
    assert cells == {"Run": "a", "β": "0.25", "Steps": "1,560", "Test ELBO": "-91.23", "KL": compare.MISSING,
                     "Active units": "2 / 2", "IWAE k": compare.MISSING}
