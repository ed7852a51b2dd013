"""The background IWAE job: same numbers as iwae_curve, progress to 1, prompt cancel, hands off the training model."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from vae_core import jobs
from vae_core.config import ModelConfig, RunConfig
from vae_core.evidence import iwae_curve
from vae_core.models import build_model
from vae_core.trainer import Trainer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return build_model(ModelConfig(latent_dim=3, hidden_dim=32)).eval()


@pytest.fixture(scope="module")
def x():
    return torch.bernoulli(torch.full((10, 1, 28, 28), 0.2), generator=torch.Generator().manual_seed(1))


def run_job(model, x, **kw) -> jobs.JobSnapshot:
    job = jobs.IwaeJob(model.config, model.state_dict(), x, **kw).start()
    job.join(30)
    snap = job.snapshot()
    assert snap.state == "done", snap.error
    return snap


def assert_same_numbers(got: dict, ref: dict) -> None:
    """Equal up to float32 rounding: another thread may split a matmul over a different number of cores.

    A different seed moves these numbers by tenths of a nat, so 1e-6 relative still tells draws apart.
    """
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        # abs too: the first paired step (k = 1 minus the ELBO) is a difference of near-equal numbers, ~0.007,
        # whose float32 rounding is ~1e-8 absolute but 4e-6 relative.
        assert got[key] == (value if key in ("ks", "n", "samples") else pytest.approx(value, rel=1e-6, abs=1e-6)), key


def test_bound_ks():
    assert jobs.bound_ks(1) == [1]
    assert jobs.bound_ks(1000) == [1, 10, 100, 1000]
    assert jobs.bound_ks(5000) == [1, 10, 100, 1000, 5000]
    assert jobs.bound_ks(50) == [1, 10, 50]
    with pytest.raises(ValueError):
        jobs.bound_ks(0)


def test_one_chunk_equals_iwae_curve_exactly(model, x):
    snap = run_job(model, x, k=100, seed=5, chunk_examples=len(x))
    ref = iwae_curve(model, x, [1, 10, 100], generator=torch.Generator().manual_seed(5))
    assert_same_numbers(snap.result, ref)
    assert snap.progress == 1.0 and snap.done == len(x)
    other_seed = iwae_curve(model, x, [1, 10, 100], generator=torch.Generator().manual_seed(6))
    with pytest.raises(AssertionError):
        assert_same_numbers(snap.result, other_seed)


def test_chunks_pool_to_the_per_example_mean_and_standard_error(model, x):
    """Chunks of one example give per-example bounds; the job must pool them like numpy does."""
    snap = run_job(model, x, k=100, seed=9, chunk_examples=1)
    gen = torch.Generator().manual_seed(9)  # the job draws chunk after chunk from one generator
    per = [iwae_curve(model, x[i:i + 1], [1, 10, 100], generator=gen) for i in range(len(x))]
    for j in range(3):
        v = np.array([p["iwae"][j] for p in per])
        assert snap.result["iwae"][j] == pytest.approx(v.mean(), rel=1e-6)
        assert snap.result["iwae_se"][j] == pytest.approx(v.std(ddof=1) / math.sqrt(len(v)), rel=1e-5)
    e = np.array([p["elbo"] for p in per])
    assert snap.result["elbo"] == pytest.approx(e.mean(), rel=1e-6)
    assert snap.result["elbo_se"] == pytest.approx(e.std(ddof=1) / math.sqrt(len(e)), rel=1e-5)
    assert snap.result["kl"] == pytest.approx(np.mean([p["kl"] for p in per]), rel=1e-6)
    # Each rise in k is pooled paired by image, and every example's own bound is kept.
    each = np.array([p["iwae_each"][0] for p in per])
    assert snap.result["iwae_each"] == pytest.approx(each.tolist(), rel=1e-6)
    for j in range(3):
        prev = e if j == 0 else np.array([p["iwae"][j - 1] for p in per])
        rise = np.array([p["iwae"][j] for p in per]) - prev
        assert snap.result["iwae_step_se"][j] == pytest.approx(rise.std(ddof=1) / math.sqrt(len(rise)), rel=1e-5)
    # Uneven chunks (4, 4, 2) pool the same way and land within Monte Carlo error of one call.
    other = run_job(model, x, k=100, seed=9, chunk_examples=4).result
    for a, b, s in zip(other["iwae"], snap.result["iwae"], snap.result["iwae_se"]):
        assert abs(a - b) < 5 * s + 0.5


def test_progress_rises_to_one(model, x):
    job = jobs.IwaeJob(model.config, model.state_dict(), x, k=2000, chunk_examples=1).start()
    seen = []
    while job.is_alive():
        seen.append(job.snapshot().progress)
        time.sleep(0.005)
    job.join()
    snap = job.snapshot()
    assert snap.state == "done" and snap.progress == 1.0
    assert all(0 <= p <= 1 for p in seen) and seen == sorted(seen)
    assert any(0 < p < 1 for p in seen)  # it reported along the way, not only at the end
    assert snap.result["ks"] == [1, 10, 100, 1000, 2000] and snap.elapsed_s > 0


def test_cancel_stops_the_job_before_it_ends(model):
    x = torch.bernoulli(torch.full((400, 1, 28, 28), 0.2), generator=torch.Generator().manual_seed(2))
    job = jobs.IwaeJob(model.config, model.state_dict(), x, k=5000).start()
    while job.snapshot().progress == 0:
        time.sleep(0.01)
    job.cancel()
    job.join(60)
    assert not job.is_alive()
    snap = job.snapshot()
    assert snap.state == "cancelled" and snap.result is None and snap.progress < 1


def test_failure_is_reported_not_raised(model, x):
    job = jobs.IwaeJob(model.config, model.state_dict(), x, k=10)
    job.x = torch.zeros(3, 1, 5, 5)  # the wrong image size: the MLP cannot take it
    job.start().join(10)
    snap = job.snapshot()
    assert snap.state == "failed" and "RuntimeError" in snap.error


def test_from_trainer_never_touches_the_training_model(tiny_sprites, monkeypatch):
    t = Trainer(RunConfig().replace(epochs=1, batch_size=64, hidden_dim=32, latent_dim=2, evidence_every=0),
                persist=False, data=tiny_sprites, num_threads=1)
    t.start()
    t.join(60)
    live = {k: v.clone() for k, v in t.math.model.state_dict().items()}

    def forbidden(*a, **kw):
        raise AssertionError("the job used the training model")

    for name in ("forward", "encode", "decode_logits"):
        monkeypatch.setattr(t.math.model, name, forbidden)
    job = jobs.IwaeJob.from_trainer(t, k=100, n=16)
    assert job.model is not t.math.model
    job_ptrs = {p.data_ptr() for p in job.model.parameters()}
    assert not job_ptrs & {p.data_ptr() for p in t.math.model.parameters()}
    assert job.weights_version == t.weights_version() and job.step == t.status().step
    job.start().join(30)
    snap = job.snapshot()
    assert snap.state == "done", snap.error
    assert all(torch.equal(v, t.math.model.state_dict()[k]) for k, v in live.items())
    # The held-out batch is the run's own fixed binarized test images, so a fixed seed repeats exactly.
    x = jobs.held_out(t.dataset(), t.config, 16)
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        ref = iwae_curve(job.model, x, [1, 10, 100], generator=torch.Generator().manual_seed(0))
    assert job.chunk >= 16  # one chunk: iwae_curve's own numbers
    assert_same_numbers(snap.result, ref)
    assert snap.result["elbo"] <= snap.result["iwae"][-1] + 3 * snap.result["iwae_se"][-1]


def test_board_keeps_one_job_per_key(model, x):
    board = jobs.JobBoard(max_keys=2)
    first = board.submit("a", jobs.IwaeJob(model.config, model.state_dict(), x, k=5000, chunk_examples=1))
    second = board.submit("a", jobs.IwaeJob(model.config, model.state_dict(), x, k=10))
    first.join(2)
    assert board.get("a") is second and first.snapshot().state in ("cancelled", "done")
    assert not first.is_alive()
    board.submit("b", jobs.IwaeJob(model.config, model.state_dict(), x, k=10))
    board.submit("c", jobs.IwaeJob(model.config, model.state_dict(), x, k=10))
    assert board.get("a") is None and board.get("c") is not None  # the oldest key is dropped
    board.cancel_all()
