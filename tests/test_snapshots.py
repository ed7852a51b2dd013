"""The time-lapse's weight snapshots (vae_core/snapshots.py): the schedule, the budget, and that they reopen
with the run after a new Lab, an export and import, a resume; a fork keeps its own."""
from __future__ import annotations

import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch

from vae_core import runs, snapshots
from vae_core.config import ConfigError, RunConfig
from vae_core.lab import Lab

SPE = 8  # steps per epoch of the runs below: 512 tiny sprites in batches of 64
Z = np.random.default_rng(0).standard_normal((32, 2)).astype(np.float32)


def config(**kw) -> RunConfig:
    return RunConfig().replace(**{"epochs": 3, "batch_size": 64, "hidden_dim": 32, "latent_dim": 2,
                                  "evidence_every": 0, **kw})


def finish(run, timeout: float = 120.0):
    run.join(timeout)
    assert run.status().state == "finished", run.status().message
    return run


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_sprites):
    from vae_core import inference

    saved = inference._DATA_CACHE.get(("sprites", None, None, None))
    inference._DATA_CACHE[("sprites", None, None, None)] = tiny_sprites  # every run here trains on the tiny sprites
    lab = Lab(tmp_path_factory.mktemp("timelapse") / "runs", max_runs=2, num_threads=1, log_every=4)
    yield lab
    lab.shutdown()
    if saved is None:
        inference._DATA_CACHE.pop(("sprites", None, None, None), None)
    else:
        inference._DATA_CACHE[("sprites", None, None, None)] = saved


@pytest.fixture(scope="module")
def trained(lab):
    """A 3-epoch run (24 steps)."""
    return finish(lab.start(config(), name="base"))


# ------------------------------------------------------------------ the schedule and the budget

def test_schedule_is_geometric_and_needs_no_run_length():
    steps = snapshots.schedule(1570)  # the default run: 10 epochs of 157 steps
    assert steps[:11] == [0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    assert len(steps) == 30
    ratios = [b / a for a, b in zip(steps[8:], steps[9:])]
    assert all(1.2 < r < 1.33 for r in ratios), ratios  # 2^(1/3) = 1.26, rounded to whole steps
    assert [n for n in range(5001) if snapshots.is_due(n)] == snapshots.schedule(5000)


def test_thinning_keeps_both_ends_and_an_even_spread():
    steps = snapshots.schedule(10**6)  # 61 snapshots for a million-step run
    dropped = snapshots.thin(steps, 20)
    kept = sorted(set(steps) - set(dropped))
    assert len(kept) == 20 and kept[0] == 0 and kept[-1] == steps[-1]
    gaps = np.diff(np.log1p(kept))
    assert gaps.max() < 3 * np.median(gaps), gaps  # no hole: dropping the oldest half would leave one of 7 nats
    assert snapshots.thin([100, 200, 300], 2, origin=100) == [200]  # a fork: spread counted from its origin


def test_config_states_the_budget_and_old_configs_load():
    old = RunConfig().to_dict()
    del old["train"]["snapshot_budget_mb"]  # a run saved before the time-lapse existed
    assert RunConfig.from_dict(old).train.snapshot_budget_mb == RunConfig().train.snapshot_budget_mb > 0
    for bad in (-1, 1e6, float("nan"), "40"):
        with pytest.raises(ConfigError, match="snapshot_budget_mb"):
            RunConfig().replace(snapshot_budget_mb=bad)
    # The default budget holds the default run's whole schedule (30 + its last step) without thinning.
    per = snapshots.snapshot_bytes(RunConfig().model)
    assert 31 * per <= snapshots.budget_bytes(RunConfig())


# ------------------------------------------------------------------ written by training

def test_training_writes_snapshots_on_the_schedule_in_float16(trained):
    assert trained.status().step == 24
    assert Lab(trained.run_dir.parent).snapshots("base") == snapshots.schedule(24) + [24]  # a new Lab reads them
    raw = torch.load(trained.run_dir / "snapshots" / "step-000000013.pt", weights_only=True)
    assert raw["step"] == 13 and all(v.dtype == torch.float16 for v in raw["model"].values())
    assert snapshots.total_bytes(trained.run_dir) <= snapshots.budget_bytes(trained.config)


def test_a_snapshot_decodes_what_the_weights_were_then(lab, trained):
    final = trained.decode(Z)
    early = lab.snapshot("base", 1)
    assert early.weights_step() == 1 and early.artifacts()["step"] == 1
    assert np.abs(early.decode(Z) - final).max() > 0.1  # an untrained decoder draws something else
    last = lab.snapshot("base", 24)
    assert np.abs(last.decode(Z) - final).max() < 1 / 255  # float16: not one grey level off
    mu_then, _ = early.encode(trained.test_set(8)[0])
    mu_now, _ = trained.encode(trained.test_set(8)[0])
    assert not np.allclose(mu_then, mu_now, atol=1e-2)
    assert lab.snapshot("base", 1) is early  # scrubbing back reloads nothing
    with pytest.raises(runs.RunFileError, match="no snapshot at step 7"):
        lab.snapshot("base", 7)


def test_the_budget_bounds_the_folder(lab, trained):
    per = (trained.run_dir / "snapshots" / "step-000000001.pt").stat().st_size  # every one is this size
    run = finish(lab.start(config(snapshot_budget_mb=5 * per / 2**20), name="small"))
    steps = lab.snapshots("small")
    assert len(steps) <= 5 and steps[0] == 0 and steps[-1] == 24, steps
    assert snapshots.total_bytes(run.run_dir) <= 5 * per
    off = finish(lab.start(config(epochs=1, snapshot_budget_mb=0), name="off"))
    assert lab.snapshots("off") == [] and not (off.run_dir / "snapshots").exists()


def test_export_and_import_carry_the_snapshots(lab, trained):
    data = lab.export("base")
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "base/snapshots/step-000000013.pt" in names
    copy = lab.import_zip(data, name="copy")
    assert lab.snapshots(copy) == lab.snapshots("base")
    assert np.array_equal(lab.snapshot(copy, 3).decode(Z), lab.snapshot("base", 3).decode(Z))


def _zip_with(run_dir, extra: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in (runs.CONFIG, runs.CHECKPOINT):
            z.write(run_dir / name, f"r/{name}")
        for name, data in extra.items():
            z.writestr(f"r/{name}", data)
    return buf.getvalue()


def test_import_refuses_a_bad_snapshot_and_ignores_foreign_files(lab, trained):
    before = {r.name for r in lab.list_runs()}
    with pytest.raises(runs.RunFileError, match=r"snapshots/step-000000001\.pt") as e:
        lab.import_zip(_zip_with(trained.run_dir, {"snapshots/step-000000001.pt": b"not a torch file"}))
    assert str(trained.run_dir.parent) not in str(e.value) and ".import-" not in str(e.value)
    # A snapshot of another model's shape is refused too, not loaded into the wrong network.
    other = io.BytesIO()
    torch.save({"version": 1, "step": 1, "model": {"w": torch.zeros(3, dtype=torch.float16)}}, other)
    with pytest.raises(runs.RunFileError, match="does not fit"):
        lab.import_zip(_zip_with(trained.run_dir, {"snapshots/step-000000001.pt": other.getvalue()}))
    many = {f"snapshots/{snapshots.file_name(i)}": b"x" for i in range(1001)}
    with pytest.raises(runs.RunFileError, match="more than 1000 snapshots"):
        lab.import_zip(_zip_with(trained.run_dir, many))
    assert {r.name for r in lab.list_runs()} == before
    good = (trained.run_dir / "snapshots" / "step-000000002.pt").read_bytes()
    name = lab.import_zip(_zip_with(trained.run_dir, {"snapshots/step-000000002.pt": good, "snapshots/notes.pt": good,
                                                      "elsewhere/step-000000004.pt": good}))
    assert lab.snapshots(name) == [2]
    assert sorted(p.name for p in (lab.path(name) / "snapshots").iterdir()) == ["step-000000002.pt"]


def test_resume_continues_the_schedule_and_a_fork_starts_its_own(lab, trained):
    finish(lab.start(config(epochs=2), name="grow"))
    assert lab.snapshots("grow") == snapshots.schedule(16)
    finish(lab.resume("grow", epochs=2))  # to step 32
    assert lab.snapshots("grow") == snapshots.schedule(32)
    child = finish(lab.fork("base", epochs=1, beta=2.0, name="child"))  # from step 24 to 32
    assert json.loads((child.run_dir / runs.CONFIG).read_text())["parent"]["step"] == 24
    # Its schedule counts from the fork point; none of the parent's history is copied.
    assert lab.snapshots("child") == [24 + n for n in snapshots.schedule(SPE)]
    assert np.abs(lab.snapshot("child", 24).decode(Z) - trained.decode(Z)).max() < 1 / 255
    assert math.isclose(snapshots.origin_of(child.run_dir), 24)


@pytest.mark.slow  # a subprocess that imports torch: ~7 s on a busy machine
def test_the_cli_sets_the_budget_and_refuses_a_bad_one_in_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "VAE_NUM_THREADS": "1"}
    env.pop("VAE_RUNS_DIR", None)
    r = subprocess.run([sys.executable, "-m", "vae_core", "train", "--snapshot-budget-mb", "-1"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "snapshot_budget_mb must be between 0 and 400" in r.stderr
