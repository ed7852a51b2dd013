"""Run directories: contents, checkpoints, resume, fork, listing, safety of names and files."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from helpers import train_to_end
from vae_core import runs
from vae_core.config import ConfigError
from vae_core.transfer import export_zip, import_zip
from vae_core.trainer import Trainer


def train(tiny_config, tiny_sprites, runs_dir, **kw):
    return train_to_end(Trainer(tiny_config.replace(**kw), runs_dir=runs_dir, data=tiny_sprites, log_every=2))


def test_run_directory_contents(tiny_config, tiny_sprites, runs_dir):
    t = train(tiny_config, tiny_sprites, runs_dir, beta=0.5)
    d = t.run_dir
    assert d.parent == runs_dir and d.name.startswith("sprites-z2-b0.5-")
    assert {p.name for p in d.iterdir()} == {"config.json", "metrics.jsonl", "checkpoint.pt", "status.json",
                                             "model.safetensors", "model.json",  # the weights without pickle
                                             "snapshots"}  # the time-lapse (vae_core/snapshots.py)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["train"]["seed"] == 0 and cfg["train"]["beta"] == 0.5 and "torch" in cfg["versions"]
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows == t.metrics()
    for r in rows:
        if r["split"] == "disentangle":  # the code's MIG/DCI/KL terms after each epoch: no ELBO of their own
            assert {"step", "epoch", "tc_kl", "wall_time"} <= set(r)
            continue
        assert {"step", "epoch", "split", "elbo", "recon", "kl", "beta", "wall_time"} <= set(r)
    assert all("samples_per_s" in r for r in rows if r["split"] == "test")
    ckpt = runs.load_checkpoint(d / "checkpoint.pt")
    assert ckpt["step"] == t.status().step and "optimizer" in ckpt
    assert runs.read_status(d)["state"] == "finished"


def test_checkpoint_round_trip_gives_same_outputs(tiny_config, tiny_sprites, runs_dir):
    t = train(tiny_config, tiny_sprites, runs_dir)
    opened = Trainer.open(t.run_dir, data=tiny_sprites)
    z = torch.randn(5, 2).numpy()
    assert (opened.decode(z) == t.decode(z)).all()
    assert opened.metrics() == t.metrics()
    assert opened.status().state == "finished"
    assert opened.artifacts()["samples"].shape == (64, 28, 28)


def test_resume_continues_steps_and_appends_metrics(tiny_config, tiny_sprites, runs_dir):
    t = train(tiny_config, tiny_sprites, runs_dir, epochs=1)
    steps = t.status().step
    r = Trainer.open(t.run_dir, data=tiny_sprites, log_every=2)
    r.start(epochs=2)
    r.join(60)
    assert r.status().state == "finished" and r.status().step == 3 * steps
    rows = runs.read_metrics(t.run_dir)
    assert [m["epoch"] for m in rows if m["split"] == "test"] == [1, 2, 3]
    assert [m["step"] for m in rows] == sorted(m["step"] for m in rows)


def test_resume_equals_uninterrupted_on_cpu(tiny_config, tiny_sprites, runs_dir):
    """Optimizer and generator state travel in the checkpoint, so 1+1 epochs == 2 epochs."""
    full = train(tiny_config, tiny_sprites, runs_dir, epochs=2)
    half = train(tiny_config, tiny_sprites, runs_dir, epochs=1)
    r = Trainer.open(half.run_dir, data=tiny_sprites, log_every=2)
    r.start(epochs=1)
    r.join(60)
    a = [round(m["elbo"], 3) for m in full.metrics() if "elbo" in m]  # disentangle rows carry no ELBO
    b = [round(m["elbo"], 3) for m in runs.read_metrics(half.run_dir) if "elbo" in m]
    assert a == b


def test_fork_records_parent_and_step(tiny_config, tiny_sprites, runs_dir):
    parent = train(tiny_config, tiny_sprites, runs_dir, epochs=1)
    f = Trainer(parent.config.replace(beta=4.0, epochs=1), runs_dir=runs_dir, data=tiny_sprites,
                init_from=parent.run_dir, name="forked")
    f.start()
    f.join(60)
    cfg = json.loads((f.run_dir / "config.json").read_text())
    assert cfg["parent"] == {"run": parent.run_dir.name, "step": parent.status().step}
    assert cfg["train"]["beta"] == 4.0
    assert f.metrics()[0]["step"] > parent.status().step


def test_corrupt_metrics_line_is_skipped_with_warning(tiny_config, tiny_sprites, runs_dir):
    t = train(tiny_config, tiny_sprites, runs_dir)
    with open(t.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "spl')  # half-written line, as after a crash
    with pytest.warns(RuntimeWarning, match="corrupt line"):
        rows = runs.read_metrics(t.run_dir)
    assert len(rows) == len(t.metrics())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_code_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "checkpoint.pt"
    torch.save({"version": 1, "model": {}, "config": {}, "step": 0, "x": _Payload(str(marker))}, path)
    with pytest.raises(runs.RunFileError, match="never loaded"):
        runs.load_checkpoint(path)
    assert not marker.exists()
    with open(path, "wb") as f:  # a plain pickle, not even a torch zip
        pickle.dump(_Payload(str(marker)), f)
    with pytest.raises(runs.RunFileError):
        runs.load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_bad_checkpoints_name_the_file(tiny_config, tiny_sprites, runs_dir, content):
    t = train(tiny_config, tiny_sprites, runs_dir, epochs=1)
    path = t.run_dir / "checkpoint.pt"
    if content is None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    else:
        path.write_bytes(content)
    with pytest.raises(runs.RunFileError, match="checkpoint.pt"):
        Trainer.open(t.run_dir)


def test_wrong_version_checkpoint(tmp_path):
    torch.save({"version": 99, "model": {}, "config": {}, "step": 0}, tmp_path / "c.pt")
    with pytest.raises(runs.RunFileError, match="version 99"):
        runs.load_checkpoint(tmp_path / "c.pt")


@pytest.mark.parametrize("name,expected", [("my run", "my-run"), ("../../etc/passwd", "etc-passwd"),
                                           ("a/b\\c", "a-b-c"), ("..", None), ("/", None), ("ok.v2", "ok.v2")])
def test_name_sanitising(name, expected, tmp_path):
    if expected is None:
        with pytest.raises(ConfigError):
            runs.sanitize_name(name)
    else:
        assert runs.sanitize_name(name) == expected
        assert runs.resolve_run(tmp_path, name).parent == tmp_path.resolve()


def test_listing_newest_first_and_marks_interrupted(tiny_config, tiny_sprites, runs_dir):
    a = train(tiny_config, tiny_sprites, runs_dir, epochs=1)
    b = train(tiny_config, tiny_sprites, runs_dir, epochs=1, beta=2.0)
    os.utime(a.run_dir, (1, 1))
    runs.write_status(b.run_dir, "running")
    st = json.loads((b.run_dir / "status.json").read_text())
    st["pid"] = 2**22 + 12345  # a process that does not exist
    (b.run_dir / "status.json").write_text(json.dumps(st))
    rows = runs.list_runs(runs_dir)
    assert [r.name for r in rows] == [b.run_dir.name, a.run_dir.name] or rows[0].created >= rows[1].created
    by = {r.name: r for r in rows}
    assert by[b.run_dir.name].status == "interrupted"
    assert by[a.run_dir.name].best_test_elbo == max(m["elbo"] for m in a.metrics() if m["split"] == "test")


def test_zip_export_import_and_resume(tiny_config, tiny_sprites, runs_dir, tmp_path):
    t = train(tiny_config, tiny_sprites, runs_dir, epochs=1)
    data = export_zip(t.run_dir)
    other = tmp_path / "other-machine"
    d = import_zip(data, other)
    assert d.parent == other and (d / "checkpoint.pt").exists()
    r = Trainer.open(d, data=tiny_sprites)
    r.start(epochs=1)
    r.join(60)
    assert r.status().state == "finished" and r.status().step == 2 * t.status().step


def test_zip_with_escaping_member_is_refused(tmp_path):
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../evil/config.json", "{}")
        z.writestr("run/checkpoint.pt", b"x")
    with pytest.raises(runs.RunFileError, match="outside"):
        import_zip(buf.getvalue(), tmp_path / "runs")
    assert not (tmp_path / "evil").exists()


def test_delete_and_rename(tiny_config, tiny_sprites, runs_dir):
    t = train(tiny_config, tiny_sprites, runs_dir, epochs=1)
    new = runs.rename_run(runs_dir, t.run_dir.name, "../my best run")
    assert new == (runs_dir / "my-best-run").resolve() and (new / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match="already exists"):
        other = train(tiny_config, tiny_sprites, runs_dir, epochs=1)
        runs.rename_run(runs_dir, other.run_dir.name, "my-best-run")
    runs.write_status(new, "running")  # this process is alive: the run counts as training
    with pytest.raises(runs.RunFileError, match="training"):
        runs.delete_run(runs_dir, "my-best-run")
    runs.write_status(new, "stopped")
    runs.delete_run(runs_dir, "my-best-run")
    assert not new.exists()
    with pytest.raises(runs.RunFileError):
        runs.delete_run(runs_dir, "my-best-run")


def test_metrics_csv(tiny_config, tiny_sprites, runs_dir):
    import csv
    import io

    t = train(tiny_config, tiny_sprites, runs_dir, epochs=1)
    rows = list(csv.DictReader(io.StringIO(runs.metrics_csv(t.metrics()))))
    assert len(rows) == len(t.metrics()) and {"step", "split", "elbo", "kl_per_dim"} <= set(rows[0])
    assert float(rows[-1]["elbo"]) == pytest.approx(t.metrics()[-1]["elbo"])


def test_status_records_how_far_a_run_is_headed(tiny_config, tiny_sprites, runs_dir):
    """Runs trained N more epochs, and forks, plan past config.epochs: the listing and a reopen see the real plan."""
    t = train(tiny_config, tiny_sprites, runs_dir, epochs=1)
    r = Trainer.open(t.run_dir, data=tiny_sprites, log_every=2)
    r.start(epochs=2)
    r.join(60)
    (row,) = runs.list_runs(runs_dir)
    assert (row.epochs_done, row.epochs_planned) == (3, 3)
    f = Trainer(t.config.replace(epochs=2), runs_dir=runs_dir, data=tiny_sprites, init_from=t.run_dir, name="child")
    f.start()
    f.join(60)
    child = {x.name: x for x in runs.list_runs(runs_dir)}["child"]
    assert (child.epochs_done, child.epochs_planned) == (5, 5)  # the parent's 3, then its own 2
    assert Trainer.open(f.run_dir).status().epochs_target == 5
