"""What each latent encodes: MIG, DCI, the β-TCVAE decomposition of the KL, and latent traversals.

All the math is numpy on encoder outputs (mu, logvar), so it serves the trainer's per-epoch row,
`evaluate --metrics`, and the dashboard (through the Lab) alike; only `measure_model` touches torch.

- MIG (Chen et al. 2018, eq. 8): for each true factor v_k, the gap between the two largest
  I(z_j; v_k) over latents j, divided by H(v_k); averaged over factors. Estimated as in
  disentanglement_lib: the codes' means are cut into 20 equal-width bins, continuous factors too,
  and the plug-in mutual information of the joint histogram is used.
- DCI (Eastwood & Williams 2018): an importance matrix R (latents x factors) from a regressor that
  predicts each factor from the codes; here a lasso (the paper's first regressor; its random forests
  are not available here) fitted by coordinate descent on standardized codes and factors, with
  R_jk = |w_jk|. Disentanglement: 1 - entropy (base K) of each latent's row, weighted by the row's share
  of R; completeness: 1 - entropy (base D) of each factor's column, averaged over factors;
  informativeness: the lasso's R^2 on a held-out quarter (1 - NRMSE^2 in the paper's terms).
- β-TCVAE decomposition (Chen et al. 2018, eq. 2): E_x KL(q(z|x) || p(z)) = I_q(x; z) (index-code MI)
  + KL(q(z) || prod_d q(z_d)) (total correlation) + sum_d KL(q(z_d) || p(z_d)) (dimension-wise KL),
  with q(z) estimated by minibatch-weighted sampling (their sec. 4.1) over a fixed held-out batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from .data import SPRITE_FACTORS, SPRITE_SHAPES
from .records import active_mask

N_BINS = 20  # disentanglement_lib's histogram discretization of codes
MEASURE_N = 2000  # held-out images the per-epoch metrics use (the whole sprites test set)
TC_BATCH = 500  # of those, the batch the β-TCVAE terms are estimated on (cost grows as its square: 1000 took ~1 s)
LASSO_ALPHA = 0.005  # on standardized codes: random codes scored D 0.33 here, 0.49 at 0.02 (sparser, so "purer")
LASSO_SWEEPS = 200
TRAVERSAL_STEPS = 9
# Rotations a shape cannot show: a square repeats every quarter turn, an ellipse every half, a triangle every third.
SYMMETRY_ORDER = {"square": 4, "ellipse": 2, "triangle": 3}
METRICS = ("mig", "dci", "tc")


# ------------------------------------------------------------------ the true factors

def sprite_truth(factors: np.ndarray) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Names, values (N, K) and a discrete mask (K,) of the sprites' factors as an image can show them.

    Rotation becomes the fraction of the shape's own symmetry period (0..1): a square turned by a
    quarter turn is the same image, so no code could tell the raw angles apart.
    """
    f = np.asarray(factors, dtype=np.float64).copy()
    order = np.array([SYMMETRY_ORDER[s] for s in SPRITE_SHAPES])[f[:, 0].astype(int)]
    period = 2 * np.pi / order
    f[:, 2] = np.mod(f[:, 2], period) / period
    return SPRITE_FACTORS, f, np.array([True, False, False, False, False])


def discretize(values: np.ndarray, discrete: np.ndarray | None = None, n_bins: int = N_BINS) -> np.ndarray:
    """Integer bin ids (N, C): equal-width bins per column, or the distinct values where discrete."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty(values.shape, dtype=np.int64)
    for c in range(values.shape[1]):
        col = values[:, c]
        if discrete is not None and discrete[c]:
            out[:, c] = np.unique(col, return_inverse=True)[1]
        else:
            edges = np.histogram(col, bins=n_bins)[1]
            out[:, c] = np.digitize(col, edges[1:-1])  # 0 .. n_bins-1
    return out


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plug-in I(a_i; b_k) in nats from two integer arrays (N, I) and (N, K) -> (I, K)."""
    out = np.zeros((a.shape[1], b.shape[1]))
    for i in range(a.shape[1]):
        for k in range(b.shape[1]):
            na, nb = a[:, i].max() + 1, b[:, k].max() + 1
            joint = np.bincount(a[:, i] * nb + b[:, k], minlength=na * nb).reshape(na, nb).astype(np.float64)
            out[i, k] = _entropy(joint.sum(1)) + _entropy(joint.sum(0)) - _entropy(joint.ravel())
    return np.maximum(out, 0.0)


# ------------------------------------------------------------------ MIG

def mig(codes: np.ndarray, factors: np.ndarray, discrete: np.ndarray | None = None) -> dict[str, Any]:
    """MIG and the normalized factor-by-latent mutual information matrix I(z_j; v_k) / H(v_k), (K, D)."""
    zb = discretize(codes)
    vb = discretize(factors, discrete)
    mi = mutual_information(zb, vb)  # (D, K)
    h = np.array([_entropy(np.bincount(vb[:, k]).astype(np.float64)) for k in range(vb.shape[1])])
    norm = mi.T / np.maximum(h, 1e-12)[:, None]  # (K, D)
    top = np.sort(norm, axis=1)[:, ::-1]
    gaps = top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0.0)
    return {"mig": float(gaps.mean()), "mig_per_factor": gaps.tolist(), "mi_matrix": norm.tolist()}


# ------------------------------------------------------------------ DCI

def lasso(x: np.ndarray, y: np.ndarray, alpha: float = LASSO_ALPHA, sweeps: int = LASSO_SWEEPS) -> np.ndarray:
    """Weights W (D, T) minimizing 1/(2n) ||y - x W||^2 + alpha |W|_1 for columns of x with unit variance.

    Coordinate descent (Friedman et al. 2010), all targets at once; columns with no variance stay at 0.
    """
    n, d = x.shape
    w = np.zeros((d, y.shape[1]))
    col_sq = (x ** 2).sum(0) / n  # 1 for standardized columns, 0 for constant ones
    r = y.copy()
    for _ in range(sweeps):
        biggest = 0.0
        for j in range(d):
            if col_sq[j] == 0:
                continue
            rho = x[:, j] @ r / n + col_sq[j] * w[j]  # (T,)
            new = np.sign(rho) * np.maximum(np.abs(rho) - alpha, 0.0) / col_sq[j]
            delta = new - w[j]
            if np.any(delta):
                r -= np.outer(x[:, j], delta)
                w[j] = new
                biggest = max(biggest, float(np.abs(delta).max()))
        if biggest < 1e-6:
            break
    return w


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    ok = std > 1e-8
    scale = np.where(ok, std, 1.0)
    return np.where(ok, (train - mean) / scale, 0.0), np.where(ok, (test - mean) / scale, 0.0)


def _targets(factors: np.ndarray, discrete: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Regression targets: continuous factors as they are, a discrete one as one-hot columns; owner factor of each."""
    cols, owner = [], []
    for k in range(factors.shape[1]):
        if discrete[k]:
            for v in np.unique(factors[:, k]):
                cols.append((factors[:, k] == v).astype(np.float64))
                owner.append(k)
        else:
            cols.append(factors[:, k])
            owner.append(k)
    return np.stack(cols, 1), owner


def dci(codes: np.ndarray, factors: np.ndarray, discrete: np.ndarray | None = None,
        alpha: float = LASSO_ALPHA) -> dict[str, Any]:
    """DCI disentanglement, completeness, informativeness from a lasso's |weights| (see the module docstring)."""
    codes = np.asarray(codes, dtype=np.float64)
    factors = np.asarray(factors, dtype=np.float64)
    discrete = np.zeros(factors.shape[1], bool) if discrete is None else np.asarray(discrete, bool)
    n_train = (3 * len(codes)) // 4
    y, owner = _targets(factors, discrete)
    x_tr, x_te = _standardize(codes[:n_train], codes[n_train:])
    y_tr, y_te = _standardize(y[:n_train], y[n_train:])
    w = lasso(x_tr, y_tr, alpha)  # (D, T)
    d, k = codes.shape[1], factors.shape[1]
    owner = np.array(owner)
    imp = np.stack([np.abs(w[:, owner == f]).sum(1) for f in range(k)], 1)  # (D, K)
    resid = ((y_te - x_te @ w) ** 2).mean(0)
    var = np.maximum(y_te.var(0), 1e-12)
    r2_cols = np.clip(1 - resid / var, 0.0, 1.0)
    r2 = np.array([r2_cols[owner == f].mean() for f in range(k)])
    total = imp.sum()
    if total <= 0:  # nothing predicts anything: no structure to credit
        return {"dci_disentanglement": 0.0, "dci_completeness": 0.0, "dci_informativeness": float(r2.mean()),
                "dci_importance": imp.tolist()}
    rows = imp.sum(1)
    p_rows = imp / np.maximum(rows[:, None], 1e-300)
    h_rows = -(np.where(p_rows > 0, p_rows * np.log(np.where(p_rows > 0, p_rows, 1)), 0)).sum(1) / math.log(k) \
        if k > 1 else np.zeros(d)
    disent = float(((1 - h_rows) * rows / total).sum())
    cols = imp.sum(0)
    p_cols = imp / np.maximum(cols[None, :], 1e-300)
    h_cols = -(np.where(p_cols > 0, p_cols * np.log(np.where(p_cols > 0, p_cols, 1)), 0)).sum(0) / math.log(d) \
        if d > 1 else np.zeros(k)
    complete = float(np.where(cols > 0, 1 - h_cols, 0.0).mean())
    return {"dci_disentanglement": disent, "dci_completeness": complete, "dci_informativeness": float(r2.mean()),
            "dci_importance": imp.tolist()}


# ------------------------------------------------------------------ β-TCVAE decomposition

def _log_normal(z: np.ndarray, mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / np.exp(logvar))


def noise_rng(seed: int) -> np.random.Generator:
    """The draws z ~ q(z|x) use their own stream: default_rng(seed) alone would repeat a caller's codes drawn
    with the same seed (eps == mu made the sampled KL read 10.5 nats against a closed form of 5.6)."""
    return np.random.default_rng((seed, 0x7C5E))


def kl_decomposition(mu: np.ndarray, logvar: np.ndarray, *, n_data: int, seed: int = 0) -> dict[str, float]:
    """Index-code MI, total correlation and dimension-wise KL (nats per example) on one batch (M, D).

    One z_i ~ q(z|x_i) per example. q(z) = (1/N) sum_n q(z|x_n) over the N = n_data held-out images is
    estimated from the batch with minibatch weights (Chen et al. 2018, sec. 4.1): z_i's own example
    weighs 1/N, each other one (N-1)/(N(M-1)), which makes the estimate of q(z_i) unbiased. (The
    paper's shortcut, log sum_j q(z_i|x_j) - log(NM), shifts log q(z) by -log N and the product of
    marginals by -D log N: TC read 53 nats on 8 independent latents.) The three terms telescope to
    the sampled E[log q(z|x) - log p(z)]; "tc_kl" is the closed form on the same batch, so the two
    differ by Monte-Carlo error (tc_kl_sum_se, its standard error) when the sampling and densities are right.
    """
    mu, logvar = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
    m, d = mu.shape
    z = mu + np.exp(0.5 * logvar) * noise_rng(seed).standard_normal((m, d))  # (M, D)
    log_qzx = _log_normal(z, mu, logvar).sum(1)  # (M,)
    log_pz = _log_normal(z, np.zeros_like(z), np.zeros_like(z)).sum(1)
    n = max(int(n_data), m)
    log_w = np.full((m, m), math.log((n - 1) / (n * (m - 1))) if m > 1 else 0.0)  # (i, j): weight of x_j for z_i
    np.fill_diagonal(log_w, -math.log(n))
    log_qz, log_prod = np.empty(m), np.empty(m)
    chunk = max(1, 2_000_000 // (m * d))
    const, inv_var = -0.5 * (math.log(2 * math.pi) + logvar), np.exp(-logvar)  # (M, D)
    for s in range(0, m, chunk):
        lq = const[None] - 0.5 * (z[s:s + chunk, None, :] - mu[None]) ** 2 * inv_var[None]  # (c, M, D): log q(z_id|x_j)
        w = log_w[s:s + chunk]  # (c, M)
        log_qz[s:s + chunk] = _logsumexp(lq.sum(2) + w, 1)
        log_prod[s:s + chunk] = _logsumexp(lq + w[:, :, None], 1).sum(1)
    per = log_qzx - log_pz
    return {"tc_mi": float((log_qzx - log_qz).mean()), "tc_tc": float((log_qz - log_prod).mean()),
            "tc_dwkl": float((log_prod - log_pz).mean()), "tc_kl_sum": float(per.mean()),
            "tc_kl_sum_se": float(per.std(ddof=1) / math.sqrt(m)) if m > 1 else 0.0,
            "tc_kl": float((0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar)).sum(1).mean()), "tc_batch": m,
            "tc_n_data": n}


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    top = a.max(axis, keepdims=True)
    return (np.log(np.exp(a - top).sum(axis, keepdims=True)) + top).squeeze(axis)


# ------------------------------------------------------------------ all of it, for a run

def measure(mu: np.ndarray, logvar: np.ndarray, test_factors: np.ndarray | None, *,
            metrics: tuple[str, ...] = METRICS, seed: int = 0, n_data: int | None = None) -> dict[str, Any]:
    """The metrics asked for on held-out codes (N, D); MIG and DCI only where the factors are known."""
    out: dict[str, Any] = {"n_examples": len(mu)}
    if not (np.isfinite(mu).all() and np.isfinite(logvar).all()):  # a diverged model: the trainer says so itself
        return {**out, "nonfinite": True}
    if "tc" in metrics:
        b = min(TC_BATCH, len(mu))
        out.update(kl_decomposition(mu[:b], logvar[:b], n_data=n_data or len(mu), seed=seed))
    if test_factors is not None and ("mig" in metrics or "dci" in metrics):
        names, values, discrete = sprite_truth(np.asarray(test_factors)[:len(mu)])
        out["factors"] = list(names)
        if "mig" in metrics:
            out.update(mig(mu, values, discrete))
        if "dci" in metrics:
            out.update(dci(mu, values, discrete))
    return out


ROW_KEYS = ("mig", "dci_disentanglement", "dci_completeness", "dci_informativeness", "tc_mi", "tc_tc",
            "tc_dwkl", "tc_kl_sum", "tc_kl_sum_se", "tc_kl")


def row(result: dict[str, Any]) -> dict[str, Any]:
    """The scalars of a measure() result, for one metrics.jsonl line (split "disentangle")."""
    return {k: round(float(result[k]), 5) for k in ROW_KEYS if k in result}


def epoch_row(math_: Any, data: Any, *, seed: int = 0) -> dict[str, Any]:
    """The trainer's per-epoch row: the metrics on the first MEASURE_N held-out images, as evaluated."""
    x = math_.test_xb[:MEASURE_N]
    return row(measure_model(math_.model, x, data.test_factors, seed=seed, n_data=len(x)))


def for_weights(weights: Any, *, metrics: tuple[str, ...] = METRICS, seed: int = 0) -> dict[str, Any]:
    """measure() on a reader's weights (inference.Weights): what the Latents tab and `evaluate` show.

    Raises DatasetUnavailable where the run's data are not on this machine.
    """
    x = weights.held_out(MEASURE_N)
    mu, logvar = weights.encode(x)
    out = measure(mu, logvar, weights.dataset().test_factors, metrics=metrics, seed=seed, n_data=len(x))
    return {**out, "step": weights.step()}


def traversal_for(weights: Any, index: int | None = 0, steps: int = TRAVERSAL_STEPS) -> Traversal:
    """Traversals of a reader's weights; rows ordered by KL on the first 500 held-out images; the other
    latents held at held-out image `index`'s posterior mean, or at 0 (the prior's mean) when index is None."""
    step = weights.step()
    x = weights.held_out(max(500, (index or 0) + 1))
    if index is not None and not 0 <= index < len(x):
        from .config import ConfigError

        raise ConfigError(f"test image {index} does not exist: the run's test set has {len(x)} images")
    mu, logvar = weights.encode(x)
    base = np.zeros(mu.shape[1]) if index is None else mu[index]
    return traversal(mu[:500], logvar[:500], base, weights.decode, step=step, steps=steps)


def measure_model(model: Any, x: Any, test_factors: np.ndarray | None, *, seed: int = 0,
                  metrics: tuple[str, ...] = METRICS, n_data: int | None = None) -> dict[str, Any]:
    """measure() on a torch model's encoding of held-out images x (N, 1, 28, 28), in eval mode."""
    import torch

    with torch.no_grad():
        was = model.training
        model.eval()
        outs = [model.encode(x[i:i + 1000]) for i in range(0, len(x), 1000)]
        model.train(was)
    mu = torch.cat([o[0] for o in outs]).double().cpu().numpy()
    logvar = torch.cat([o[1] for o in outs]).double().cpu().numpy()
    return measure(mu, logvar, test_factors, metrics=metrics, seed=seed, n_data=n_data)


# ------------------------------------------------------------------ traversals

@dataclass(frozen=True)
class Traversal:
    """Decoded traversals, most informative latent first: images[r, s] is row r's latent set to values[s]."""

    images: np.ndarray  # (D, S, 28, 28) float32 in [0, 1]
    dims: np.ndarray  # (D,) the latent index of each row
    kl: np.ndarray  # (D,) each row's KL(q(z_d|x) || p(z_d)), nats, averaged over held-out images
    collapsed: np.ndarray  # (D,) bool: KL at most records.ACTIVE_THRESHOLD
    values: np.ndarray  # (S,) the prior's quantiles swept through
    base: np.ndarray  # (D,) the code the other latents are held at (index order)
    step: int  # the weights' training step


def prior_quantiles(steps: int = TRAVERSAL_STEPS) -> np.ndarray:
    """steps quantiles of N(0, 1) at probabilities (i + 0.5) / steps: equal prior mass between them."""
    nd = NormalDist()
    return np.array([nd.inv_cdf((i + 0.5) / steps) for i in range(steps)])


def traversal(mu: np.ndarray, logvar: np.ndarray, base: np.ndarray, decode: Any, *, step: int = 0,
              steps: int = TRAVERSAL_STEPS) -> Traversal:
    """Each latent swept across the prior's quantiles with the others at `base`, rows ordered by KL.

    mu, logvar: held-out codes (N, D) whose mean KL per dimension orders the rows; decode: (M, D) -> (M, H, W) or (M, H, W, 3).
    """
    kl = (0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar)).mean(0)  # (D,)
    order = np.argsort(-kl, kind="stable")
    values = prior_quantiles(steps)
    d = mu.shape[1]
    z = np.repeat(np.asarray(base, np.float32)[None, None], d, 0).repeat(steps, 1)  # (D, S, D)
    z[np.arange(d), :, order] = values[None].astype(np.float32)
    decoded = np.asarray(decode(z.reshape(d * steps, d)))  # (D*S, H, W) grey or (D*S, H, W, 3) colour
    images = decoded.reshape(d, steps, *decoded.shape[1:])
    return Traversal(images.astype(np.float32), order, kl[order], np.array([not a for a in active_mask(kl[order])]),
                     values, np.asarray(base, np.float64), step)


def evaluate_run(run_dir: Any, metrics: tuple[str, ...], *, seed: int = 0,
                 data_dir: str | None = None) -> dict[str, Any]:
    """`evaluate --metrics mig,dci,tc` on a saved run's checkpoint: the same numbers as its per-epoch rows."""
    from pathlib import Path

    from .config import ConfigError
    from .evaluate import load_model
    from .inference import get_dataset, held_out

    model, config, ckpt = load_model(Path(run_dir))
    data = get_dataset(config.train.dataset, data_dir)
    wanted = [m for m in metrics if m in ("mig", "dci")]
    if wanted and data.test_factors is None:
        raise ConfigError(f"{' and '.join(wanted)} need a dataset whose generating factors are known (sprites); "
                          f"{config.train.dataset} has none. --metrics tc works on any run")
    x = held_out(data, config, MEASURE_N)
    out = measure_model(model, x, data.test_factors, seed=seed, metrics=tuple(metrics), n_data=len(x))
    rounded = {k: (np.round(np.asarray(v, dtype=np.float64), 4).tolist() if isinstance(v, list) and k != "factors"
                   else round(v, 5) if isinstance(v, float) else v) for k, v in out.items()}
    return {"run": Path(run_dir).name, "step": int(ckpt["step"]), **rounded}
