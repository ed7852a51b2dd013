"""RunMath's held-out images and its importance-weighted numbers' memory."""
from __future__ import annotations

import torch

from vae_core.config import ModelConfig
from vae_core.evaluate import held_out_batch
from vae_core.evidence import iwae_curve
from vae_core.inference import held_out
from vae_core.models import build_model
from vae_core.objectives import iwae_bound
from vae_core.run_math import RunMath


def test_the_trainers_test_set_is_the_held_out_binarization(tiny_config, tiny_sprites):
    """The trainer's test numbers and every other evaluation use one binarization of the test set: the
    run's generator (a device generator on a GPU) must not enter it."""
    cfg = tiny_config.replace(binarize=True)
    m = RunMath(cfg, tiny_sprites, torch.device("cpu"), lr=1e-3)
    for _ in range(3):  # drawing training batches moves the run's generator; the test set stays put
        m.train_step(m.batch(torch.arange(64)), beta=1.0, free_bits=0.0, lr=1e-3)
    want = held_out(tiny_sprites, cfg, len(tiny_sprites.test_x))
    assert torch.equal(m.test_xb, want)
    assert set(torch.unique(want).tolist()) == {0.0, 1.0}
    other_seed = held_out(tiny_sprites, cfg.replace(seed=1), len(tiny_sprites.test_x))
    assert not torch.equal(want, other_seed)


def test_cli_evaluate_uses_the_same_held_out_images(tiny_config, tiny_sprites, monkeypatch):
    from vae_core import inference

    cfg = tiny_config.replace(binarize=True)
    monkeypatch.setitem(inference._DATA_CACHE, ("sprites", None, None, None), tiny_sprites)
    m = RunMath(cfg, tiny_sprites, torch.device("cpu"), lr=1e-3)
    assert torch.equal(held_out_batch(cfg, 50), m.test_xb[:50])


def test_iwae_k5000_decodes_in_bounded_chunks():
    """k = 5000 importance samples never decode more than the chunk bound at once (memory stays bounded),
    and all k x B samples are decoded."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=4, hidden_dim=32))
    x = torch.bernoulli(torch.rand(8, 1, 28, 28))
    rows = []
    decode = model.decode_logits

    def recording(z):
        rows.append(z.shape[0])
        return decode(z)

    model.decode_logits = recording
    bound = 200_000  # pixels decoded at once: 255 of the 8 x 5000 samples
    with torch.no_grad():
        out = iwae_bound(model, x, 5000, generator=torch.Generator().manual_seed(1), max_chunk_elems=bound)
    assert sum(rows) == 5000 * 8 and max(rows) * 784 <= bound and len(rows) > 1
    assert torch.isfinite(out).all() and out.shape == (8,)
    rows.clear()
    with torch.no_grad():
        curve = iwae_curve(model, x, (1, 100, 5000), generator=torch.Generator().manual_seed(1), max_chunk_elems=bound)
    assert sum(rows) == 5000 * 8 and max(rows) * 784 <= bound
    assert curve["iwae"][-1] >= curve["iwae"][0] - 1.0  # the bound rises with k (up to noise)
