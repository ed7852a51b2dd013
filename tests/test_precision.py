"""bf16 mixed precision (TrainConfig.precision): what runs in bfloat16, what stays float32, and that it trains."""
from __future__ import annotations

import json

import pytest
import torch

from vae_core import cli, devices
from vae_core.config import ConfigError, RunConfig
from vae_core.devices import mixed_dtype
from vae_core.run_math import RunMath


def dtypes_seen(model) -> list[torch.dtype]:
    """The output dtypes of the encoder's first layer and the decoder's last, recorded by hooks."""
    seen: list[torch.dtype] = []
    first = next(m for m in model.encoder.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    last = [m for m in model.decoder.modules() if isinstance(m, (torch.nn.Linear, torch.nn.ConvTranspose2d))][-1]
    for layer in (first, last):
        layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_bf16_steps_compute_in_bfloat16_and_everything_else_stays_float32(tiny_config, tiny_sprites, arch):
    m = RunMath(tiny_config.replace(precision="bf16", arch=arch), tiny_sprites, torch.device("cpu"), lr=1e-3)
    seen = dtypes_seen(m.model)
    stats = m.train_step(m.batch(torch.arange(64)), beta=1.0, free_bits=0.0, lr=1e-3)
    assert seen == [torch.bfloat16, torch.bfloat16]  # the nets ran in bfloat16 ...
    assert stats.dtype == torch.float32 and torch.isfinite(stats).all()  # ... the loss in float32
    assert all(p.dtype == torch.float32 for p in m.model.parameters())
    assert all(t.dtype == torch.float32 for s in m.opt.state.values() for k, t in s.items() if k != "step")

    seen.clear()
    ev = m.evaluate()  # evaluation (eval mode): float32, as in an fp32 run with the same weights
    assert set(seen) == {torch.float32}
    ref = RunMath(tiny_config.replace(arch=arch), tiny_sprites, torch.device("cpu"), lr=1e-3)
    ref.model.load_state_dict(m.model.state_dict())
    ref.gen.set_state(torch.Generator().manual_seed(5).get_state())
    m.gen.set_state(torch.Generator().manual_seed(5).get_state())
    assert m.evaluate() == ref.evaluate()
    assert ev["elbo"] < 0


def test_fp32_runs_never_autocast(tiny_config, tiny_sprites):
    m = RunMath(tiny_config, tiny_sprites, torch.device("cpu"), lr=1e-3)
    assert m.model.mixed_dtype is None
    seen = dtypes_seen(m.model)
    m.train_step(m.batch(torch.arange(64)), beta=1.0, free_bits=0.0, lr=1e-3)
    assert seen == [torch.float32, torch.float32]


@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic"])
def test_bf16_trains_like_fp32(tiny_config, tiny_sprites, likelihood):
    """From the same seed, 2 epochs: the first step's loss and the final test ELBO agree with float32's."""
    out = {}
    for precision in ("fp32", "bf16"):
        m = RunMath(tiny_config.replace(precision=precision, likelihood=likelihood), tiny_sprites,
                    torch.device("cpu"), lr=3e-3)
        losses = [m.train_step(m.batch(idx), beta=1.0, free_bits=0.0, lr=3e-3)[0].item()
                  for _ in range(2) for idx in m.batcher.epoch()]
        out[precision] = losses, m.evaluate()["elbo"]
    (l32, e32), (l16, e16) = out["fp32"], out["bf16"]
    assert l16[0] == pytest.approx(l32[0], rel=1e-3)  # same weights, same noise: only the matmuls' rounding differs
    assert l16[-1] < 0.7 * l16[0]  # it learned
    # Measured: 0.22 nats apart on Bernoulli (-236 nats), 3.0 on the discretized logistic (-1,991 nats per image).
    assert e16 == pytest.approx(e32, abs=0.005 * abs(e32))


def test_bf16_is_refused_where_it_cannot_run(monkeypatch):
    assert mixed_dtype("fp32", torch.device("cpu")) is None
    assert mixed_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ConfigError, match="not on mps; use precision fp32"):
        mixed_dtype("bf16", torch.device("mps"))
    monkeypatch.setattr(devices.torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(devices.torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    with pytest.raises(ConfigError, match=r"this GPU \(Tesla T4\) has no bfloat16 support"):
        mixed_dtype("bf16", torch.device("cuda"))
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16; got 'fp16'"):
        RunConfig().replace(precision="fp16")
    old = RunConfig().to_dict()
    del old["train"]["precision"]  # a run saved before the setting existed
    assert RunConfig.from_dict(old).train.precision == "fp32"


def test_cli_trains_in_bf16_and_resume_keeps_it(runs_dir, sprites_cached, capsys):
    args = ["--runs-dir", str(runs_dir), "--dataset", "sprites", "--epochs", "1", "--batch-size", "64",
            "--hidden-dim", "32", "--latent-dim", "2", "--evidence-every", "0", "--quiet"]
    assert cli.main(["train", *args, "--precision", "bf16", "--name", "b"]) == 0
    assert json.loads((runs_dir / "b" / "status.json").read_text())["device"].endswith("· bf16 mixed precision")
    assert json.loads((runs_dir / "b" / "config.json").read_text())["train"]["precision"] == "bf16"
    capsys.readouterr()
    rc = cli.main(["train", "--resume", "b", "--runs-dir", str(runs_dir), "--precision", "fp32", "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "keeps the run's precision" in err and "Traceback" not in err
    assert cli.main(["train", "--resume", "b", "--runs-dir", str(runs_dir), "--epochs", "1", "--quiet"]) == 0
    assert json.loads((runs_dir / "b" / "config.json").read_text())["train"]["precision"] == "bf16"


@pytest.mark.slow
def test_the_compiled_step_runs_bf16_like_the_eager_step(tiny_config, tiny_sprites, monkeypatch):
    """The compiled loss (compiled_step.py) traces the autocast regions: its loss matches the eager bf16 step's."""
    from vae_core import compiled_step

    monkeypatch.setenv("VAE_COMPILE", "1")
    cfg = tiny_config.replace(precision="bf16")
    fast = RunMath(cfg, tiny_sprites, torch.device("cpu"), lr=1e-3)
    monkeypatch.setenv("VAE_COMPILE", "0")
    slow = RunMath(cfg, tiny_sprites, torch.device("cpu"), lr=1e-3)
    idx = torch.arange(64)
    fast.compiled.start(fast.model, fast.batch(idx))
    assert fast.compiled.join(600), fast.compiled.error
    fast.compiled._calls = compiled_step.COMPILE_AFTER_STEPS  # started above: the switch is due
    slow.model.load_state_dict(fast.model.state_dict())
    slow.gen.set_state(fast.gen.get_state())
    compiled, calls = fast.compiled._fn, []
    fast.compiled._fn = lambda *a, **k: calls.append(1) or compiled(*a, **k)  # (hooks would make Dynamo recompile)
    a = fast.train_step(fast.batch(idx), beta=1.0, free_bits=0.0, lr=1e-3)
    b = slow.train_step(slow.batch(idx), beta=1.0, free_bits=0.0, lr=1e-3)
    assert calls == [1] and fast.compiled.error is None  # the step went through the compiled loss
    torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-2)
