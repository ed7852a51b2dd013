"""The CUDA path: training and resume, bf16, the held-out images, out of memory, IWAE in bounded memory.

Marker `cuda`; skipped without a GPU (`python -m pytest -m cuda` on a GPU machine).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from vae_core import runs
from vae_core.config import ModelConfig
from vae_core.models import build_model
from vae_core.objectives import iwae_bound
from vae_core.run_math import RunMath
from vae_core.trainer import Trainer

from tests.helpers import poll_until, train_to_end

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_trainer(tiny_config, tiny_sprites, runs_dir, **kw):
    return Trainer(tiny_config.replace(device="cuda", **kw), runs_dir=runs_dir, data=tiny_sprites, log_every=2)


def test_trains_and_resumes_on_cuda(tiny_config, tiny_sprites, runs_dir):
    t = train_to_end(cuda_trainer(tiny_config, tiny_sprites, runs_dir))
    assert t.status().device.startswith("cuda")
    assert t.math.train_x.is_cuda and t.math.test_xb.is_cuda and next(t.math.model.parameters()).is_cuda
    tests = [m for m in t.metrics() if m["split"] == "test"]
    assert len(tests) == 2 and all(np.isfinite(m["elbo"]) for m in tests)
    step = t.status().step
    again = Trainer.open(t.run_dir, data=tiny_sprites, log_every=2)
    train_to_end(again, epochs=1)
    assert again.status().step == step + 512 // 64
    ckpt = runs.load_checkpoint(t.run_dir / runs.CHECKPOINT)  # readable on a CPU-only machine
    assert all(not v.is_cuda for v in ckpt["model"].values())


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="GPU without bf16")
def test_bf16_trains_on_cuda_like_fp32(tiny_config, tiny_sprites):
    """Mixed precision on the GPU: the nets run in bfloat16, weights stay float32, and it trains like float32."""
    out = {}
    for precision in ("fp32", "bf16"):
        m = RunMath(tiny_config.replace(device="cuda", precision=precision, arch="conv"), tiny_sprites,
                    torch.device("cuda"), lr=3e-3)
        seen = []
        m.model.decoder.register_forward_hook(lambda _m, _i, o: seen.append(o.dtype))
        losses = [m.train_step(m.batch(idx), beta=1.0, free_bits=0.0, lr=3e-3)[0].item()
                  for _ in range(2) for idx in m.batcher.epoch()]
        assert seen[0] == (torch.bfloat16 if precision == "bf16" else torch.float32)
        assert all(p.dtype == torch.float32 for p in m.model.parameters())
        out[precision] = losses, m.evaluate()["elbo"]
    assert out["bf16"][0][-1] < 0.7 * out["bf16"][0][0]
    assert out["bf16"][1] == pytest.approx(out["fp32"][1], abs=0.01 * abs(out["fp32"][1]))


def test_cuda_evaluates_the_cpu_held_out_images(tiny_config, tiny_sprites):
    cfg = tiny_config.replace(binarize=True)
    gpu = RunMath(cfg, tiny_sprites, torch.device("cuda"), lr=1e-3)
    cpu = RunMath(cfg, tiny_sprites, torch.device("cpu"), lr=1e-3)
    assert torch.equal(gpu.test_xb.cpu(), cpu.test_xb)
    gpu.model.load_state_dict(cpu.model.state_dict())
    a, b = gpu.evaluate(), cpu.evaluate()  # same images, same weights: only the eps noise differs
    assert abs(a["elbo"] - b["elbo"]) < 2.0


def test_out_of_memory_on_cuda_pauses_with_the_reason(tiny_config, tiny_sprites, runs_dir):
    t = cuda_trainer(tiny_config, tiny_sprites, runs_dir, batch_size=512, hidden_dim=64, epochs=1)
    hog = []
    t.start()
    poll_until(lambda: t.status().step >= 1 or t.status().state != "running", 120, "a first step")
    t.pause()
    poll_until(lambda: t.status().state == "paused", 60, "the pause")
    try:  # take (nearly) all free memory so the next step cannot allocate
        while True:
            hog.append(torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda"))
    except torch.OutOfMemoryError:
        pass
    t.resume()
    poll_until(lambda: "out of memory" in t.status().message, 120, "the out-of-memory message")
    assert t.status().state == "paused" and t.is_alive()
    hog.clear()
    torch.cuda.empty_cache()
    t.resume()
    t.join(120)
    assert t.status().state == "finished", t.status().message


def test_iwae_k5000_in_bounded_memory_on_cuda():
    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=20, hidden_dim=400)).cuda()
    x = torch.bernoulli(torch.rand(64, 1, 28, 28, device="cuda"))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = iwae_bound(model, x, 5000, generator=torch.Generator(device="cuda").manual_seed(1))
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(out).all()
    # Unchunked, 5000 x 64 decodes would hold 320,000 x 784 float32 logits (1 GB) at least; chunked, a few
    # chunks of 2M elements (8 MB each) plus the (k, B) weights.
    assert peak < 256 * 2 ** 20, f"peak {peak / 2 ** 20:.0f} MiB"


@pytest.mark.slow
def test_compiled_step_with_cuda_graphs_trains_like_eager(tiny_config, tiny_sprites, monkeypatch):
    monkeypatch.setenv("VAE_COMPILE", "1")
    fast = RunMath(tiny_config, tiny_sprites, torch.device("cuda"), lr=1e-3)
    monkeypatch.setenv("VAE_COMPILE", "0")
    slow = RunMath(tiny_config, tiny_sprites, torch.device("cuda"), lr=1e-3)
    idx = torch.arange(64, device="cuda")
    from vae_core.compiled_step import COMPILE_AFTER_STEPS

    for _ in range(COMPILE_AFTER_STEPS):
        fast.train_step(fast.batch(idx), beta=1.0, free_bits=0.0, lr=1e-3)
    assert fast.compiled.join(600), fast.compiled.error
    for _ in range(5):  # each from the same state: model, Adam's moments (copied, not shared), generator
        slow.model.load_state_dict(fast.model.state_dict())
        slow.opt.load_state_dict(copy.deepcopy(fast.opt.state_dict()))
        slow.gen.set_state(fast.gen.get_state())
        a = fast.train_step(fast.batch(idx), beta=0.8, free_bits=0.0, lr=1e-3)
        b = slow.train_step(slow.batch(idx), beta=0.8, free_bits=0.0, lr=1e-3)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-2)
    assert fast.compiled.error is None
