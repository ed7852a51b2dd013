"""model.safetensors + model.json beside every checkpoint, and docs/load-model.md run as written."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from helpers import train_to_end
from vae_core import runs
from vae_core.model_files import MODEL_JSON, SAFETENSORS, load_model
from vae_core.models import build_model
from vae_core.trainer import Trainer

DOC = Path(__file__).resolve().parents[1] / "docs" / "load-model.md"


def _checkpoint_model(run_dir):
    ckpt = runs.load_checkpoint(run_dir / runs.CHECKPOINT)
    from vae_core.config import RunConfig

    model = build_model(RunConfig.from_dict(ckpt["config"]).model)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def _run(tiny_sprites, runs_dir, config, name):
    return train_to_end(Trainer(config, runs_dir=runs_dir, name=name, data=tiny_sprites), timeout=120).run_dir


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory, tiny_sprites):
    from vae_core.config import RunConfig

    config = RunConfig().replace(epochs=1, batch_size=64, hidden_dim=64, latent_dim=3, evidence_every=0)
    return _run(tiny_sprites, tmp_path_factory.mktemp("runs"), config, "mlp")


def test_every_checkpoint_writes_safetensors_that_give_the_checkpoints_outputs(mlp_run, tiny_sprites):
    assert (mlp_run / SAFETENSORS).is_file() and (mlp_run / MODEL_JSON).is_file()
    ref, ckpt = _checkpoint_model(mlp_run)
    desc = json.loads((mlp_run / MODEL_JSON).read_text())
    assert (desc["arch"], desc["latent_dim"], desc["hidden_dim"], desc["likelihood"]) == ("mlp", 3, 64, "bernoulli")
    assert desc["step"] == ckpt["step"] and desc["config"] == ckpt["config"]

    model = load_model(mlp_run)  # a fresh model from the safetensors file alone (no pickle)
    x = tiny_sprites.test_x[:32]
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(model.encode(x), ref.encode(x)):
            assert torch.equal(a, b)
        assert torch.equal(model.decode(z), ref.decode(z))
        assert not torch.equal(model.decode(z), build_model(ref.config).decode(z))  # not any model's outputs


def test_safetensors_follow_the_checkpoint_on_resume(mlp_run, tiny_sprites):
    from safetensors import safe_open

    t = Trainer.open(mlp_run, data=tiny_sprites)
    train_to_end(t, epochs=1, timeout=120)
    ref, ckpt = _checkpoint_model(mlp_run)
    with safe_open(str(mlp_run / SAFETENSORS), "pt") as f:
        assert json.loads(f.metadata()["vae_dashboard"])["step"] == ckpt["step"] > 0
        for k, v in ckpt["model"].items():
            assert torch.equal(f.get_tensor(k), v)
    assert not list(mlp_run.glob(".*.tmp"))  # atomic writes leave no temp file


def test_load_model_refuses_weights_that_do_not_fit_their_description(mlp_run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(mlp_run, bad)
    desc = json.loads((bad / MODEL_JSON).read_text())
    desc["config"]["model"]["latent_dim"] = 5
    (bad / MODEL_JSON).write_text(json.dumps(desc))
    with pytest.raises(runs.RunFileError, match="does not fit its model.json"):
        load_model(bad)
    (bad / SAFETENSORS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    desc["config"]["model"]["latent_dim"] = 3
    (bad / MODEL_JSON).write_text(json.dumps(desc))
    with pytest.raises(runs.RunFileError, match="cannot be loaded"):
        load_model(bad)


def test_without_safetensors_the_checkpoint_is_still_written(tiny_sprites, tiny_config, tmp_path, monkeypatch,
                                                             capsys):
    from vae_core import model_files

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    monkeypatch.setattr(model_files, "_warned_missing", False)
    run_dir = _run(tiny_sprites, tmp_path, tiny_config.replace(epochs=2), "plain")  # two checkpoints, one line
    assert (run_dir / runs.CHECKPOINT).is_file() and not (run_dir / SAFETENSORS).exists()
    lines = [x for x in capsys.readouterr().err.splitlines() if "safetensors" in x]
    assert len(lines) == 1 and 'pip install -e ".[interop]"' in lines[0]


def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_snippets_load_real_runs_in_plain_pytorch(mlp_run, tiny_sprites, tmp_path):
    from vae_core.config import RunConfig

    load, mlp, conv, with_package = _doc_blocks()
    assert 'run = "runs/my-run"' in load
    assert len(load.strip().splitlines()) + len(mlp.strip().splitlines()) <= 12  # "ten lines", give or take
    conv_run = _run(tiny_sprites, tmp_path, RunConfig().replace(
        arch="conv", epochs=1, batch_size=64, hidden_dim=32, latent_dim=2, evidence_every=0, train_size=128),
        "conv")
    x = tiny_sprites.test_x[:16]
    for run_dir, blocks in ((mlp_run, [load, mlp]), (conv_run, [load, conv])):
        ns: dict = {}
        for code in blocks:  # the page's code exactly, only the run's path put in
            exec(compile(code.replace('"runs/my-run"', repr(str(run_dir))), str(DOC), "exec"), ns)
        ref, _ = _checkpoint_model(run_dir)
        with torch.no_grad():
            mu, logvar = ns["encode"](x)
            ref_mu, ref_logvar = ref.encode(x)
            torch.testing.assert_close(mu, ref_mu)
            torch.testing.assert_close(logvar, ref_logvar)
            z = torch.randn(4, ref.latent_dim)
            torch.testing.assert_close(ns["decode"](z), ref.decode(z))
    ns = {}
    exec(compile(with_package.replace('"runs/my-run"', repr(str(conv_run))), str(DOC), "exec"), ns)
    assert ns["model"].config.arch == "conv"
