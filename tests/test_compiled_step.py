"""The compiled training loss: the same objective as the eager one, when it is used, and the switch."""
from __future__ import annotations

import copy

import pytest
import torch

from vae_core import compiled_step
from vae_core.compiled_step import COMPILE_MIN_STEPS, compile_wanted, step_loss
from vae_core.config import ModelConfig
from vae_core.models import build_model
from vae_core.objectives import elbo_loss, elbo_terms


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian-learned"])
@pytest.mark.parametrize("free_bits", [0.0, 0.5])
def test_step_loss_is_the_eager_objective(likelihood, free_bits):
    """Uncompiled, step_loss with the generator's eps equals elbo_terms + elbo_loss with the same generator."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=3, hidden_dim=16, likelihood=likelihood))
    x = torch.rand(5, 1, 28, 28)
    terms = elbo_terms(model, x, torch.Generator().manual_seed(4))
    want = elbo_loss(terms, beta=0.7, free_bits=free_bits)
    eps = torch.randn((5, 3), generator=torch.Generator().manual_seed(4))  # VAE.reparameterize's draw
    got = step_loss(model, x, eps, torch.tensor(0.7), torch.tensor(free_bits), free_bits > 0)
    torch.testing.assert_close(got, torch.stack([want, terms.recon.mean(), terms.kl.mean()]))


def test_compile_is_chosen_for_long_runs_and_by_the_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("VAE_COMPILE", raising=False)
    monkeypatch.setattr(compiled_step.shutil, "which", lambda name: "/usr/bin/g++")
    assert compile_wanted(cpu, COMPILE_MIN_STEPS) and not compile_wanted(cpu, COMPILE_MIN_STEPS - 1)
    assert not compile_wanted(torch.device("mps"), 10 ** 6)
    assert not compile_wanted(cpu, 10 ** 6, "conv")  # measured slower compiled on the CPU
    monkeypatch.setattr(compiled_step.shutil, "which", lambda name: None)
    assert not compile_wanted(cpu, 10 ** 6)  # inductor's CPU backend needs a C++ compiler
    monkeypatch.setenv("VAE_COMPILE", "0")
    monkeypatch.setattr(compiled_step.shutil, "which", lambda name: "/usr/bin/g++")
    assert not compile_wanted(cpu, 10 ** 6)
    monkeypatch.setenv("VAE_COMPILE", "1")
    assert compile_wanted(cpu, 1)


def test_a_short_run_never_compiles(tiny_config, tiny_sprites, monkeypatch):
    from vae_core.run_math import RunMath

    monkeypatch.delenv("VAE_COMPILE", raising=False)
    m = RunMath(tiny_config, tiny_sprites, torch.device("cpu"), lr=1e-3)
    assert m.compiled is None


@pytest.mark.slow
def test_compiled_steps_train_like_eager_steps(tiny_config, tiny_sprites, monkeypatch):
    """After the background compile the run switches to it, and from the same state the compiled and the
    eager step make the same update (same eps stream from the run's generator)."""
    from vae_core.run_math import RunMath

    monkeypatch.setenv("VAE_COMPILE", "1")
    cfg = tiny_config.replace(binarize=True)
    fast = RunMath(cfg, tiny_sprites, torch.device("cpu"), lr=1e-3)
    monkeypatch.setenv("VAE_COMPILE", "0")
    slow = RunMath(cfg, tiny_sprites, torch.device("cpu"), lr=1e-3)
    assert fast.compiled is not None and slow.compiled is None
    idx = torch.arange(64)
    for _ in range(compiled_step.COMPILE_AFTER_STEPS):
        fast.train_step(fast.batch(idx), beta=1.0, free_bits=0.0, lr=1e-3)
    assert fast.compiled.join(600), fast.compiled.error
    for beta in (0.5, 0.9, 1.0):  # beta changes every step during warm-up: no recompiling
        slow.model.load_state_dict(fast.model.state_dict())  # from the same state each time
        slow.opt.load_state_dict(copy.deepcopy(fast.opt.state_dict()))  # else both share Adam's moments
        slow.gen.set_state(fast.gen.get_state())
        a = fast.train_step(fast.batch(idx), beta=beta, free_bits=0.1, lr=1e-3)
        b = slow.train_step(slow.batch(idx), beta=beta, free_bits=0.1, lr=1e-3)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
        for k, v in fast.model.state_dict().items():
            # Adam moves each weight by ~lr whatever the gradient's size, so where a gradient is ~0 the two
            # rounding orders can move it differently; the update is the same elsewhere.
            diff = (v - slow.model.state_dict()[k]).abs()
            assert diff.max() < 3e-3 and (diff > 1e-5).float().mean() < 0.01, k
    assert fast.compiled.get() is not None and fast.compiled.error is None


def test_compiling_starts_only_after_the_first_log_point(monkeypatch):
    """The dashboard's first curve point comes at step 20 (log_every): the compile must not compete with it."""
    from vae_core.compiled_step import COMPILE_AFTER_STEPS, CompiledStep

    started = []
    step = CompiledStep(torch.device("cpu"))
    monkeypatch.setattr(step, "start", lambda model, x: started.append(len(x)))
    model = build_model(ModelConfig(latent_dim=2, hidden_dim=16))
    x = torch.rand(4, 1, 28, 28)
    for i in range(1, COMPILE_AFTER_STEPS + 5):
        assert step.loss(model, x, torch.Generator(), beta=1.0, free_bits=0.0) is None  # eager until ready
        assert started == ([4] if i >= COMPILE_AFTER_STEPS else []), i
    assert COMPILE_AFTER_STEPS > 20
