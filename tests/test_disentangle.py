"""MIG, DCI, the β-TCVAE decomposition and traversals against references written here, not shared with the product."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from vae_core import disentangle as dis
from vae_core.config import ConfigError
from vae_core.data import sprite_factors
from vae_core.inference import Weights
from vae_core.run_math import RunMath


# ------------------------------------------------------------------ references: slow, direct, per the papers

def ref_bins(column, discrete, n_bins=20):
    """disentanglement_lib's rule written out: equal-width bins over the column's range, or the values themselves."""
    if discrete:
        values = sorted(set(column.tolist()))
        return [values.index(v) for v in column.tolist()]
    lo, hi = float(min(column)), float(max(column))
    return [min(int((v - lo) / (hi - lo) * n_bins), n_bins - 1) if hi > lo else 0 for v in column.tolist()]


def ref_mi(a, b):
    """Plug-in mutual information of two lists of labels, in nats: sum p(a,b) log p(a,b) / (p(a) p(b))."""
    n = len(a)
    pa, pb, pab = Counter(a), Counter(b), Counter(zip(a, b))
    return sum(c / n * math.log((c / n) / (pa[x] / n * pb[y] / n)) for (x, y), c in pab.items())


def ref_mig(codes, factors, discrete):
    """Chen et al. 2018, eq. 8: mean over factors of (top I - second I) / H(v_k)."""
    zs = [ref_bins(codes[:, j], False) for j in range(codes.shape[1])]
    gaps = []
    for k in range(factors.shape[1]):
        v = ref_bins(factors[:, k], discrete[k])
        h = ref_mi(v, v)  # I(v; v) = H(v)
        mis = sorted((ref_mi(z, v) for z in zs), reverse=True)
        gaps.append((mis[0] - mis[1]) / h)
    return sum(gaps) / len(gaps)


@pytest.fixture(scope="module")
def truth():
    _, values, discrete = dis.sprite_truth(sprite_factors(1000, 11))
    return values, discrete


def test_mig_copying_the_factors_is_one_and_random_codes_zero(truth):
    values, discrete = truth
    rng = np.random.default_rng(3)
    perm = values[:, [3, 0, 4, 2, 1]] * np.array([2.0, -1.0, 0.5, 3.0, 1.0])  # a permuted, rescaled copy
    assert dis.mig(perm, values, discrete)["mig"] > 0.9
    assert dis.mig(rng.standard_normal((1000, 8)), values, discrete)["mig"] < 0.05


def test_mig_and_its_heatmap_match_the_reference(truth):
    values, discrete = truth
    rng = np.random.default_rng(4)
    # Partly disentangled: z0 = x, z1 = x + y mixed, z2 = scale + noise, z3 noise.
    codes = np.c_[values[:, 3], values[:, 3] + values[:, 4], values[:, 1] + 0.1 * rng.standard_normal(1000),
                  rng.standard_normal(1000)]
    got = dis.mig(codes, values, discrete)
    assert got["mig"] == pytest.approx(ref_mig(codes, values, discrete), abs=1e-9)
    mi = np.array(got["mi_matrix"])  # (K, D)
    assert mi.shape == (5, 4)
    x_bins = ref_bins(values[:, 3], False)
    assert mi[3, 0] == pytest.approx(ref_mi(ref_bins(codes[:, 0], False), x_bins) / ref_mi(x_bins, x_bins))
    assert mi[3].argmax() == 0 and mi[1].argmax() == 2  # x lives in z0, scale in z2


def test_lasso_matches_soft_thresholding_on_an_orthogonal_design():
    rng = np.random.default_rng(5)
    n = 400
    q, _ = np.linalg.qr(rng.standard_normal((n, 6)))
    x = q * math.sqrt(n)  # x.T x / n = I: the lasso solution is soft-thresholded least squares
    y = x @ rng.standard_normal((6, 3)) * 0.1 + rng.standard_normal((n, 3))
    ols = x.T @ y / n
    expected = np.sign(ols) * np.maximum(np.abs(ols) - 0.05, 0)
    np.testing.assert_allclose(dis.lasso(x, y, 0.05), expected, atol=1e-8)


def ref_dci_scores(imp):
    """Eastwood & Williams 2018, sec. 3 from an importance matrix R (D, K), with loops."""
    d, k = len(imp), len(imp[0])
    total = sum(map(sum, imp))
    dis_ = 0.0
    for j in range(d):
        row = sum(imp[j])
        if row > 0:
            h = -sum(p / row * math.log(p / row, k) for p in imp[j] if p > 0)
            dis_ += (1 - h) * row / total
    comp = []
    for f in range(k):
        col = sum(imp[j][f] for j in range(d))
        comp.append(1 + sum(imp[j][f] / col * math.log(imp[j][f] / col, d) for j in range(d) if imp[j][f] > 0)
                    if col > 0 else 0.0)
    return dis_, sum(comp) / k


def test_dci_identity_is_disentangled_random_is_not(truth):
    values, discrete = truth
    rng = np.random.default_rng(6)
    ident = dis.dci(values[:, [2, 4, 0, 1, 3]], values, discrete)
    rand = dis.dci(rng.standard_normal((1000, 10)), values, discrete)
    assert ident["dci_disentanglement"] > 0.9 and ident["dci_completeness"] > 0.9
    assert ident["dci_informativeness"] > 0.8
    assert rand["dci_disentanglement"] < 0.5 and rand["dci_completeness"] < 0.5
    assert rand["dci_informativeness"] < 0.05
    for got in (ident, rand):
        d_ref, c_ref = ref_dci_scores(got["dci_importance"])
        assert got["dci_disentanglement"] == pytest.approx(d_ref, abs=1e-9)
        assert got["dci_completeness"] == pytest.approx(c_ref, abs=1e-9)


# ------------------------------------------------------------------ the β-TCVAE terms

def test_kl_terms_match_the_exact_aggregate_when_the_batch_is_the_whole_set():
    """With M = N every weight is 1/N, so q(z) is exact: compare each term with loops over the set."""
    rng = np.random.default_rng(7)
    m, d = 40, 3
    mu = rng.standard_normal((m, d)) * np.array([1.5, 0.3, 1.0])
    mu[:, 2] = mu[:, 0] * 0.8  # correlated codes: a real total correlation
    logvar = np.log(rng.uniform(0.05, 0.5, (m, d)))
    got = dis.kl_decomposition(mu, logvar, n_data=m, seed=99)
    z = mu + np.exp(0.5 * logvar) * dis.noise_rng(99).standard_normal((m, d))

    def logn(v, a, lv):
        return -0.5 * (math.log(2 * math.pi) + lv + (v - a) ** 2 / math.exp(lv))

    mi = tc = dw = 0.0
    for i in range(m):
        lqzx = sum(logn(z[i, e], mu[i, e], logvar[i, e]) for e in range(d))
        lqz = math.log(sum(math.exp(sum(logn(z[i, e], mu[j, e], logvar[j, e]) for e in range(d))) for j in range(m)) / m)
        lprod = sum(math.log(sum(math.exp(logn(z[i, e], mu[j, e], logvar[j, e])) for j in range(m)) / m)
                    for e in range(d))
        lpz = sum(logn(z[i, e], 0.0, 0.0) for e in range(d))
        mi, tc, dw = mi + (lqzx - lqz) / m, tc + (lqz - lprod) / m, dw + (lprod - lpz) / m
    assert (got["tc_mi"], got["tc_tc"], got["tc_dwkl"]) == pytest.approx((mi, tc, dw), abs=1e-9)
    assert got["tc_tc"] > 0.3  # z2 copies 0.8 z0


def test_the_sampled_kl_is_not_fooled_by_codes_drawn_with_the_same_seed():
    mu = np.random.default_rng(0).standard_normal((500, 4))
    got = dis.kl_decomposition(mu, np.full((500, 4), -1.0), n_data=500, seed=0)
    assert abs(got["tc_kl_sum"] - got["tc_kl"]) < 4 * got["tc_kl_sum_se"]


def test_non_finite_codes_measure_nothing():
    mu = np.full((10, 2), np.nan)
    assert dis.measure(mu, mu, np.zeros((10, 5))) == {"n_examples": 10, "nonfinite": True}
    assert dis.row(dis.measure(mu, mu, None)) == {}


def test_independent_codes_have_no_total_correlation():
    rng = np.random.default_rng(8)
    mu = rng.standard_normal((1000, 8))
    # Posteriors wide enough that the aggregate of 5000 of them is smooth (with sd 0.2 each point's own bump
    # dominates q(z) and a finite set's TC is truly a few nats); the paper's log(NM) shortcut read 60 nats here.
    got = dis.kl_decomposition(mu, np.full((1000, 8), np.log(0.5)), n_data=5000, seed=1)
    assert abs(got["tc_tc"]) < 0.2


@pytest.fixture(scope="module")
def trained(small_config, tiny_sprites):
    cfg = small_config.replace(latent_dim=4)
    m = RunMath(cfg, tiny_sprites, torch.device("cpu"), lr=3e-3)
    for _ in range(3):
        for idx in m.batcher.epoch():
            m.train_step(m.batch(idx), beta=1.0, free_bits=0.0, lr=3e-3)
    w = Weights(cfg, data=tiny_sprites)
    w.publish(m.weights_cpu(), 24)
    return m, w


@pytest.fixture(scope="module")
def small_config():
    from vae_core.config import RunConfig

    return RunConfig().replace(epochs=2, batch_size=64, hidden_dim=64, latent_dim=2, evidence_every=0)


def test_kl_terms_add_up_to_the_closed_form_kl_of_a_trained_model(trained):
    m, w = trained
    res = dis.measure_model(m.model, m.test_xb, None, metrics=("tc",), seed=3, n_data=len(m.test_xb))
    ev = m.evaluate()
    assert res["tc_kl"] == pytest.approx(ev["kl"], rel=1e-4)  # the closed form, the trainer's number
    assert abs(res["tc_mi"] + res["tc_tc"] + res["tc_dwkl"] - res["tc_kl"]) < 4 * res["tc_kl_sum_se"]
    assert res["tc_kl"] > 1 and 0 <= res["tc_mi"] <= math.log(len(m.test_xb)) + 1e-9


# ------------------------------------------------------------------ traversals

def test_traversal_rows_are_ordered_by_kl_and_decode_the_sweep(trained):
    _, w = trained
    tr = dis.traversal_for(w, index=5, steps=7)
    assert tr.images.shape == (4, 7, 28, 28) and tr.images.dtype == np.float32
    assert sorted(tr.dims.tolist()) == [0, 1, 2, 3]
    mu, logvar = w.encode(w.held_out(500))
    kl = (0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar)).mean(0)
    np.testing.assert_allclose(tr.kl, np.sort(kl)[::-1], rtol=1e-5)
    assert list(tr.collapsed) == [bool(v <= 0.1) for v in tr.kl]
    np.testing.assert_allclose(tr.values, -tr.values[::-1], atol=1e-12)  # symmetric quantiles of N(0, 1)
    assert tr.values[0] == pytest.approx(-1.4652337926855223)  # Phi^-1(0.5 / 7)
    np.testing.assert_allclose(tr.base, mu[5], rtol=1e-6)
    row = 1
    z = np.repeat(mu[5][None], 7, 0)
    z[:, tr.dims[row]] = tr.values
    np.testing.assert_allclose(tr.images[row], w.decode(z), atol=1e-6)
    with pytest.raises(ConfigError, match="test image 128 does not exist"):
        dis.traversal_for(w, index=128)  # the tiny test set has 128
    zero = dis.traversal_for(w, index=None, steps=3)
    assert not zero.base.any() and zero.images.shape == (4, 3, 28, 28)


# ------------------------------------------------------------------ where they are used: the trainer and the CLI

def test_each_epoch_writes_a_row_and_evaluate_metrics_reproduces_it(tiny_sprites, runs_dir, monkeypatch, capsys):
    from vae_core import cli, inference
    from vae_core.config import RunConfig
    from vae_core.trainer import Trainer

    cfg = RunConfig().replace(epochs=1, batch_size=64, hidden_dim=64, latent_dim=3, evidence_every=0, seed=2)
    t = Trainer(cfg, runs_dir=runs_dir, data=tiny_sprites, log_every=4, name="dis")
    t.start()
    t.join(120)
    assert t.status().state == "finished", t.status().message
    rows = [r for r in t.metrics() if r["split"] == "disentangle"]
    assert [r["epoch"] for r in rows] == [1]
    row = rows[0]
    assert set(dis.ROW_KEYS) <= set(row) and 0 <= row["mig"] <= 1
    monkeypatch.setitem(inference._DATA_CACHE, ("sprites", None, None, None), tiny_sprites)
    assert cli.main(["evaluate", str(runs_dir / "dis"), "--metrics", "mig,dci,tc", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("mig", "dci_disentanglement", "tc_tc"):
        assert out[key] == pytest.approx(row[key], abs=1e-4)
    assert np.array(out["mi_matrix"]).shape == (5, 3) and "elbo" not in out
    assert cli.main(["evaluate", str(runs_dir / "dis"), "--metrics", "mig,sap"]) == 2
    assert "--metrics takes elbo, mig, dci, tc" in capsys.readouterr().err
