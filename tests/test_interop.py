"""Runs other tools read: TensorBoard event files and MLflow runs, read back with those tools' own readers."""
from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest

from helpers import train_to_end
from vae_core import cli, runs
from vae_core.images import to_uint8
from vae_core.interop import TensorBoardListener, export_mlflow, export_tensorboard
from vae_core.model_files import load_model
from vae_core.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_sprites):
    """One real run of one epoch with its evidence row (lists per k and per example; 3 latents: no grid)."""
    from vae_core.config import RunConfig

    config = RunConfig().replace(epochs=1, batch_size=64, hidden_dim=64, latent_dim=3, evidence_every=1)
    t = Trainer(config, runs_dir=tmp_path_factory.mktemp("runs"), name="tiny", data=tiny_sprites)
    train_to_end(t, timeout=120)
    return t.run_dir


def _accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    ea.Reload()
    return ea


def _expected_scalars(rows):
    """tag -> [(step, value)], worked out here from the metrics file's rows, independently of the exporter."""
    want: dict[str, list] = {}
    for r in rows:
        for key, v in r.items():
            if key in ("step", "split", "wall_time", "ks"):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                want.setdefault(f"{r['split']}/{key}", []).append((r["step"], float(v)))
            elif key in ("iwae", "iwae_se", "iwae_step_se"):
                for k, x in zip(r["ks"], v):
                    want.setdefault(f"{r['split']}/{key}/k{k}", []).append((r["step"], x))
            elif key in ("kl_per_dim", "mu_variance"):
                for i, x in enumerate(v):
                    want.setdefault(f"{r['split']}/{key}/{i}", []).append((r["step"], x))
    return want


def _png(image_event):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("L"))


def test_tensorboard_export_reads_back_as_the_metrics_file(tiny_run, tiny_sprites, tmp_path):
    rows = runs.read_metrics(tiny_run)
    assert {r["split"] for r in rows} == {"train", "test", "evidence", "disentangle"}
    log_dir = export_tensorboard(tiny_run, tmp_path / "tb", data=tiny_sprites)
    assert log_dir == tmp_path / "tb" / "tiny"
    ea = _accumulator(log_dir)
    want = _expected_scalars(rows)
    assert sorted(ea.Tags()["scalars"]) == sorted(want)
    for tag, points in want.items():
        got = ea.Scalars(tag)
        assert [e.step for e in got] == [s for s, _ in points], tag
        np.testing.assert_allclose([e.value for e in got], [v for _, v in points], rtol=1e-6, err_msg=tag)
    assert sum(len(ea.Scalars(t)) for t in want) == sum(len(p) for p in want.values())
    assert "evidence/iwae_each" in ea.Tags()["histograms"]

    # Images from the checkpoint: the first original and its reconstruction, pixel for pixel.
    ckpt = runs.load_checkpoint(tiny_run / runs.CHECKPOINT)
    (rec,) = ea.Images("images/reconstructions")
    (samples,) = ea.Images("images/prior_samples")
    assert rec.step == samples.step == ckpt["step"]
    mosaic = _png(rec)[::2, ::2]  # upscaled 2x for TensorBoard
    x0 = tiny_sprites.test_x[:1]
    np.testing.assert_array_equal(mosaic[:28, :28], to_uint8(x0[0, 0].numpy()))
    model = load_model(tiny_run)
    recon = to_uint8(model.decode(model.encode(x0)[0])[0, 0].detach().numpy())
    assert np.abs(mosaic[29:57, :28].astype(int) - recon).max() <= 1  # row 2, after one pixel of padding

    # A second export replaces the first (no doubled points).
    export_tensorboard(tiny_run, tmp_path / "tb", data=tiny_sprites)
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    assert len(_accumulator(log_dir).Scalars("train/elbo")) == len(want["train/elbo"])


def test_tensorboard_listener_while_training_and_after_resume(tiny_sprites, tiny_config, tmp_path):
    t = Trainer(tiny_config, runs_dir=tmp_path / "runs", name="live", data=tiny_sprites)
    t.start()
    TensorBoardListener(t, tmp_path / "tb")  # attached once it runs: earlier rows are caught up
    t.join(120)
    assert t.status().state == "finished"
    ea = _accumulator(tmp_path / "tb" / "live")
    rows = runs.read_metrics(t.run_dir)
    train = [(r["step"], r["elbo"]) for r in rows if r["split"] == "train"]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in ea.Scalars("train/elbo")] == train
    last_test = [r["step"] for r in rows if r["split"] == "test"][-1]
    assert ea.Images("images/prior_samples")[-1].step == last_test

    # Resumed in a new trainer: the folder shows one history (the earlier file's points are purged).
    t2 = Trainer.open(t.run_dir, data=tiny_sprites)
    TensorBoardListener(t2, tmp_path / "tb")
    train_to_end(t2, epochs=1, timeout=120)
    rows = runs.read_metrics(t.run_dir)
    ea = _accumulator(tmp_path / "tb" / "live")
    assert len(list((tmp_path / "tb" / "live").glob("events.out.tfevents.*"))) == 2
    assert [e.step for e in ea.Scalars("train/elbo")] == [r["step"] for r in rows if r["split"] == "train"]
    assert [e.step for e in ea.Scalars("test/elbo")] == [r["step"] for r in rows if r["split"] == "test"]


def test_a_failing_event_write_never_fails_the_run(tiny_sprites, tiny_config, tmp_path, capsys):
    t = Trainer(tiny_config, runs_dir=tmp_path / "runs", name="full", data=tiny_sprites)
    tb = TensorBoardListener(t, tmp_path / "tb")

    def disk_full(_row):
        raise OSError(28, "No space left on device")

    tb._w.row = disk_full
    train_to_end(t, timeout=120)
    err = capsys.readouterr().err
    assert "TensorBoard events stopped" in err and "No space left" in err
    assert len(runs.read_metrics(t.run_dir)) > 2  # the run's own files are complete


def test_mlflow_export_reads_back_with_mlflow_client(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it; the exporter sets it too
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    rid, uri = export_mlflow(tiny_run, str(tmp_path / "mlruns"))
    assert uri == (tmp_path / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(rid)
    assert r.info.status == "FINISHED" and r.info.run_name == "tiny"
    config = json.loads((tiny_run / runs.CONFIG).read_text())
    assert r.data.params["model.latent_dim"] == "3" and r.data.params["train.epochs"] == "1"
    assert r.data.params["train.beta"] == str(config["train"]["beta"])
    rows = runs.read_metrics(tiny_run)
    for tag, split, key in (("train/elbo", "train", "elbo"), ("test/kl", "test", "kl"),
                            ("evidence/elbo_se", "evidence", "elbo_se")):
        hist = sorted(client.get_metric_history(rid, tag), key=lambda m: (m.step, m.timestamp))
        assert [(m.step, m.value) for m in hist] == [(x["step"], x[key]) for x in rows if x["split"] == split]
    iwae = client.get_metric_history(rid, "evidence/iwae/k1000")
    assert [m.value for m in iwae] == [x["iwae"][x["ks"].index(1000)] for x in rows if x["split"] == "evidence"]
    names = {a.path for a in client.list_artifacts(rid, "run")}
    assert {"run/checkpoint.pt", "run/config.json", "run/metrics.jsonl", "run/model.safetensors"} <= names
    local = client.download_artifacts(rid, "run/checkpoint.pt", str(tmp_path / "down"))
    assert open(local, "rb").read() == (tiny_run / runs.CHECKPOINT).read_bytes()


def test_cli_export_writes_every_format(tiny_run, tiny_sprites, tmp_path, monkeypatch, capsys):
    from vae_core import inference

    monkeypatch.setitem(inference._DATA_CACHE, ("sprites", None, None, None), tiny_sprites)  # the run's own data
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tiny_run / "model.safetensors").unlink()
    rc = cli.main(["export", str(tiny_run), "--tensorboard", "--tensorboard-dir", str(tmp_path / "tb"),
                   "--mlflow", "--mlflow-uri", str(tmp_path / "ml"), "--safetensors",
                   "--zip", "--zip-dir", str(tmp_path / "zips")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert (tiny_run / "model.safetensors").is_file()
    tests = [r for r in runs.read_metrics(tiny_run) if r["split"] == "test"]
    assert [e.value for e in _accumulator(tmp_path / "tb" / "tiny").Scalars("test/elbo")] == \
        [pytest.approx(r["elbo"], rel=1e-6) for r in tests]
    assert "MLflow run" in out.out and (tmp_path / "zips" / "tiny.zip").is_file()
    assert "tensorboard --logdir" in out.err


def test_cli_train_with_tensorboard_dir(tiny_sprites, tmp_path, monkeypatch, capsys):
    from vae_core import inference

    monkeypatch.setitem(inference._DATA_CACHE, ("sprites", None, None, None), tiny_sprites)
    rc = cli.main(["train", "--dataset", "sprites", "--epochs", "1", "--batch-size", "64", "--hidden-dim", "64",
                   "--latent-dim", "2", "--evidence-every", "0", "--runs-dir", str(tmp_path / "runs"),
                   "--name", "cli", "--quiet", "--tensorboard-dir", str(tmp_path / "tb")])
    assert rc == 0, capsys.readouterr().err
    rows = runs.read_metrics(tmp_path / "runs" / "cli")
    ea = _accumulator(tmp_path / "tb" / "cli")
    for split in ("train", "test"):
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in ea.Scalars(f"{split}/kl")] == \
            [(r["step"], r["kl"]) for r in rows if r["split"] == split]
    assert [e.step for e in ea.Images("images/reconstructions")] == [rows[-1]["step"]]


@pytest.mark.parametrize("argv,needle", [
    (["export", "RUN"], "say what to write"),
    (["export", "nope", "--zip"], "no run directory at nope"),
])
def test_cli_export_refuses_in_one_line(argv, needle, tiny_run, capsys):
    rc = cli.main([str(tiny_run) if a == "RUN" else a for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("module,argv", [
    ("torch.utils.tensorboard", ["export", "RUN", "--tensorboard", "--tensorboard-dir", "OUT"]),
    ("mlflow", ["export", "RUN", "--mlflow", "--mlflow-uri", "OUT"]),
    ("safetensors", ["export", "RUN", "--safetensors"]),
    ("torch.utils.tensorboard", ["train", "--epochs", "1", "--runs-dir", "OUT", "--tensorboard-dir", "OUT"]),
])
def test_missing_package_is_one_line_and_writes_nothing(module, argv, tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError, as when it is not installed
    out = tmp_path / "out"
    rc = cli.main([str(tiny_run) if a == "RUN" else str(out) if a == "OUT" else a for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert 'pip install -e ".[interop]"' in err
    assert not out.exists()
