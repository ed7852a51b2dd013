"""How far is the ELBO from log p(x)? Importance sampling for any model, quadrature for 2 latents.

log p(x) = ELBO(x) + KL(q(z|x) || p(z|x))  (Kingma & Welling 2019, eq. 2.8), so the gap between
the bound and the evidence is exactly how wrong the encoder's posterior is. The importance-weighted
bound log p_k(x) rises with k toward log p(x) (Burda et al. 2016, eq. 8 and Theorem 1), but only
as fast as q's samples find the posterior's mass: where q sits far from a posterior with several
modes, even k = 5000 can stay many nats below. With two latents the true posterior can be
evaluated on a grid, which gives log p(x), the ELBO and the KL by quadrature. Those three satisfy
log p(x) = ELBO + KL by construction, so that identity proves nothing; grid_checks instead
compares the grid's ELBO and log p(x) with estimates that do not use the grid.

Everything here runs under torch.no_grad and returns floats, numpy arrays or small dataclasses,
never live tensors. All values are nats per example.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .models import VAE
from .records import ACTIVE_THRESHOLD, IWAE_FAR_NATS, active_mask  # they live there so that the dashboard reads them without torch
from .objectives import importance_log_weights, kl_per_dim, log_normal, log_px_given_z, log_standard_normal

DEFAULT_KS = (1, 10, 100, 1000)
# Pixels decoded per chunk: 4 MB of float32 logits, plus the same again for their log-likelihood.
# On CPU anything from 0.1M to 2M runs within 3%; bigger chunks were never faster, at times 10-30%
# slower (benchmarks/bench_iwae.py).
CHUNK_ELEMS = 1_000_000

# The posterior grid. A cell is "mass" while its log density is within TAIL_NATS of the peak: a
# Gaussian posterior is then covered to ~6.3 std, and what is left out weighs < e^-20 of the peak.
TAIL_NATS = 20.0
SEARCH_HALF_WIDTH = 6.0  # the first search box is [-6, 6]^2 (6 prior std) joined with q's box
Q_STD_COVER = 6.0  # the grid also covers q's mean +- 6 std, so E_q[.] is a quadrature too ...
# ... but no wider than this, so a diffuse untrained q cannot blur the grid. At 8, a 2-epoch lr 3e-3 sprites
# model (q std up to 3.2 on one axis) kept only 98.8% of q on the grid and the grid's ELBO was up to 1.6 nats
# above Gauss-Hermite and a 400k-draw Monte Carlo estimate (which agreed): its check failed, rightly, on 4 of 8
# images. At 16 all 8 pass with >= 4 cells per std, and an 8-epoch model's grid does not change.
Q_HALF_WIDTH_MAX = 16.0
COARSE_N = 48  # points per axis of each search pass; each zooms in up to ~16x
MAX_SEARCH_PASSES = 6
# Nodes per axis for the grid-independent reference ELBO, and the coarser rule whose distance from it
# is the reference's own error estimate. The ReLU decoder's log p(x|z) has kinks, so Gauss-Hermite
# converges slowly where q is wide: on a barely trained model (q std ~0.9, ELBO ~ -450) 20 nodes were
# 0.02-0.04 nats off and 50 still ~0.01.
GAUSS_HERMITE_NODES = 48
GAUSS_HERMITE_COARSE = 32
# The checks a grid must pass (grid_checks). The grid's ELBO and Gauss-Hermite agreed to 2e-3 nats
# on 12 test images of a trained 2-latent sprites MLP (the decoder's float32 sums set that floor),
# so the tolerance is 0.01 nats plus the reference's error estimate. log p(x) is checked against
# adaptive importance sampling from the prior, q and a fitted Gaussian (REFERENCE_SAMPLES draws): within
# LOG_PX_TOL + 4 standard errors, and only when the effective sample size is at least MIN_ESS.
ELBO_TOL = 0.01
LOG_PX_TOL = 0.01
LOG_PX_SE_MULT = 4.0
MIN_ESS = 50.0
REFERENCE_SAMPLES = 30_000


def _check_ks(ks: Sequence[int]) -> list[int]:
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise ValueError(f"every k must be a whole number >= 1; got {list(ks)!r}")
    return out


@torch.no_grad()
def iwae_curve(model: VAE, x: torch.Tensor, ks: Sequence[int] = DEFAULT_KS, *,
               generator: torch.Generator | None = None, max_chunk_elems: int = CHUNK_ELEMS) -> dict[str, Any]:
    """The ELBO and log p_k(x) for each k on a fixed batch x: means and standard errors across examples.

    One encoder pass and max(ks) samples per example serve every k: the K = max(ks) log weights
    are split into floor(K / k) disjoint groups of k, and log p_k(x) (Burda et al. 2016, eq. 8) is
    averaged over the groups, an unbiased estimate of E[log p_k(x)] that costs nothing extra and
    has less noise than one group for small k. Returns lists aligned with `ks` (ascending):

    - ``elbo``: E_q[log p(x|z)] averaged over all K samples minus the closed-form KL(q || p(z));
    - ``elbo_mc``: the Monte Carlo k = 1 bound, the mean of the log weights (same expectation);
    - ``iwae`` / ``iwae_se``: mean of log p_k(x) over examples and its standard error (NaN for B = 1);
      that error is the spread across images, shared by every k;
    - ``iwae_step_se``: the standard error of each rise, paired by image: of log p_k(x) minus the
      previous k's bound (the ELBO before the first k), so it measures how sure the rise itself is;
    - ``iwae_each`` / ``elbo_each``: the largest k's bound and the ELBO of each example.
    """
    ks_sorted = _check_ks(ks)
    K = ks_sorted[-1]
    mu, logvar = model.encode(x)  # (B, D), shared by every k
    B = mu.shape[0]
    log_w, log_lik = importance_log_weights(model, x, mu, logvar, K, generator=generator,
                                           max_chunk_elems=max_chunk_elems)
    log_w = log_w.double()  # (K, B); float64 so the reductions add no error of their own
    kl = kl_per_dim(mu.double(), logvar.double()).sum(1)  # (B,)
    elbo = log_lik.double().mean(0) - kl  # (B,)

    def mean_se(v: torch.Tensor) -> tuple[float, float]:
        se = float(v.std() / math.sqrt(B)) if B > 1 else float("nan")
        return float(v.mean()), se

    iwae, iwae_se, step_se = [], [], []
    previous = elbo
    for k in ks_sorted:
        g = K // k
        bound = (torch.logsumexp(log_w[: g * k].view(g, k, B), 1) - math.log(k)).mean(0)  # (B,)
        m, s = mean_se(bound)
        iwae.append(m)
        iwae_se.append(s)
        step_se.append(mean_se(bound - previous)[1])  # paired: the image-to-image spread cancels
        previous = bound
    elbo_m, elbo_s = mean_se(elbo)
    elbo_mc, elbo_mc_s = mean_se(log_w.mean(0))
    return {"ks": ks_sorted, "iwae": iwae, "iwae_se": iwae_se, "iwae_step_se": step_se, "elbo": elbo_m,
            "elbo_se": elbo_s, "elbo_mc": elbo_mc, "elbo_mc_se": elbo_mc_s, "kl": float(kl.mean()), "n": B,
            "samples": K, "iwae_each": previous.tolist(), "elbo_each": elbo.tolist()}


# ---------------------------------------------------------------- the true posterior on a grid (2 latents)

Box = tuple[tuple[float, float], tuple[float, float]]  # ((z1 low, z1 high), (z2 low, z2 high))


@dataclass(frozen=True)
class PosteriorGrid:
    """The true posterior p(z|x) of one example on an n x n grid, and the evidence by quadrature.

    ``log_density[i, j]`` is log p(z|x) at z = (z1[j], z2[i]): rows follow z2, columns z1, as a
    heatmap draws them. It is normalised numerically: sum(exp(log_density)) * cell_area = 1.

    log_px, elbo and kl_to_posterior are midpoint-rule integrals over the same cells, with q's
    weights normalised on the grid, so log_px = elbo + kl_to_posterior holds to rounding whatever
    log_px is: it checks nothing. What can fail is grid_checks: elbo_reference is the ELBO computed
    without the grid (Gauss-Hermite quadrature on q's own axes minus the closed-form KL; its error
    estimated by a coarser rule), and
    log_px_reference (with its standard error and effective sample size) is log p(x) by importance
    sampling from a wide mixture, also without the grid (both NaN when reference_samples = 0).
    posterior_edge_mass (posterior mass in the outermost cells) and q_grid_mass (q's mass inside the
    grid, ideally 1) say whether the grid covered both; cells_per_std (the narrower of q's and the
    posterior's std per axis, in cells; the smaller axis) whether it resolved them: the midpoint
    rule is accurate to ~1e-6 from about 2 up.
    """

    z1: np.ndarray  # (n,) cell centres
    z2: np.ndarray  # (n,)
    log_density: np.ndarray  # (n, n) log p(z|x)
    q_mu: np.ndarray  # (2,)
    q_cov: np.ndarray  # (2, 2), diagonal
    log_px: float
    elbo: float
    kl_to_posterior: float
    elbo_reference: float
    elbo_reference_error: float
    log_px_reference: float
    log_px_reference_se: float
    log_px_reference_ess: float
    cell_area: float
    posterior_edge_mass: float
    q_grid_mass: float
    cells_per_std: float

    def checks(self) -> list["GridCheck"]:
        """grid_checks(self): what a reader calls without importing this module."""
        return grid_checks(self)


def _check_two_latents(model: VAE) -> None:
    d = model.config.latent_dim
    if d != 2:
        raise ValueError(f"the posterior grid needs a model with 2 latent dimensions; this one has {d}. "
                         "Use iwae_curve for log p(x) estimates at any latent size.")


def _one_example(x_single: torch.Tensor) -> torch.Tensor:
    """A batch of one, (1, ...), from one image (1, 28, 28) or a batch of one (1, 1, 28, 28)."""
    if x_single.dim() == 4:
        if x_single.shape[0] != 1:
            raise ValueError(f"posterior_grid takes one example; got a batch of {x_single.shape[0]}")
        return x_single
    return x_single.unsqueeze(0)


def _axes(box: Box, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres along each axis (midpoint rule), in the model's dtype and device."""
    return tuple(torch.linspace(lo, hi, 2 * n + 1, dtype=like.dtype, device=like.device)[1::2]  # type: ignore[return-value]
                 for lo, hi in box)


def _points(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    z2, z1 = torch.meshgrid(a2, a1, indexing="ij")  # rows z2, columns z1
    return torch.stack([z1, z2], -1).reshape(-1, 2)  # (n2 * n1, 2)


@torch.no_grad()
def _log_lik(model: VAE, x1: torch.Tensor, z: torch.Tensor, max_chunk_elems: int) -> torch.Tensor:
    """log p(x|z) for one example x1 (1, ...) at many z (M, 2): (M,) float64, decoded in chunks."""
    rows = max(1, max_chunk_elems // x1[0].numel())
    out = []
    for i in range(0, len(z), rows):
        zc = z[i:i + rows]
        out.append(log_px_given_z(model, x1.expand(len(zc), *x1.shape[1:]), model.decode_logits(zc)))
    return torch.cat(out).double()


def _log_joint(model: VAE, x1: torch.Tensor, z: torch.Tensor, max_chunk_elems: int) -> torch.Tensor:
    """log p(x|z) + log p(z), (M,) float64."""
    return _log_lik(model, x1, z, max_chunk_elems) + log_standard_normal(z.double())


def _union(a: Box, b: Box) -> Box:
    return tuple((min(p[0], q[0]), max(p[1], q[1])) for p, q in zip(a, b))  # type: ignore[return-value]


def _locate(model: VAE, x1: torch.Tensor, q_box: Box, like: torch.Tensor, max_chunk_elems: int) -> Box:
    """Where the posterior's mass is: coarse passes that zoom in on it, or widen where it meets an edge."""
    box = _union(((-SEARCH_HALF_WIDTH, SEARCH_HALF_WIDTH),) * 2, q_box)
    for _ in range(MAX_SEARCH_PASSES):
        a1, a2 = _axes(box, COARSE_N, like)
        lj = _log_joint(model, x1, _points(a1, a2), max_chunk_elems).view(COARSE_N, COARSE_N)  # (n2, n1)
        if not torch.isfinite(lj.max()):
            raise ValueError("log p(x|z) + log p(z) is not finite on the search grid; the model's weights "
                             "may have diverged (check the training loss)")
        mass = lj >= lj.max() - TAIL_NATS
        found, widened = [], False
        for dim, (lo, hi) in enumerate(box):
            idx = mass.any(dim=dim).nonzero().flatten()  # dim 0: z1, the columns
            first, last = int(idx[0]), int(idx[-1])
            h = (hi - lo) / COARSE_N
            if first == 0 or last == COARSE_N - 1:  # mass runs into the edge: extend that side
                widened = True
                lo, hi = lo - (hi - lo) * (first == 0), hi + (hi - lo) * (last == COARSE_N - 1)
                found.append((lo, hi))
            else:  # cells first..last plus one cell of margin each side
                found.append((lo + (first - 1) * h, lo + (last + 2) * h))
        target = _union(tuple(found), q_box)  # type: ignore[arg-type]
        if widened:
            box = target
            continue
        if all(t[1] - t[0] > 0.5 * (b[1] - b[0]) for t, b in zip(target, box)):
            return target  # the last pass barely zoomed: the coarse cells already resolve the mass
        box = target
    return box


@torch.no_grad()
def _elbo_gauss_hermite(model: VAE, x1: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                        max_chunk_elems: int, nodes: int = GAUSS_HERMITE_NODES) -> float:
    """E_q[log p(x|z)] by Gauss-Hermite quadrature on q's axes minus the closed-form KL(q || p(z))."""
    t, w = np.polynomial.hermite_e.hermegauss(nodes)  # for the weight exp(-t^2 / 2)
    w = w / math.sqrt(2 * math.pi)  # now E_{N(0,1)}[f] = sum w f(t)
    tt = torch.as_tensor(t, dtype=mu.dtype, device=mu.device)
    z = mu + _points(tt, tt) * torch.exp(0.5 * logvar)  # (m^2, 2)
    ww = torch.as_tensor(np.outer(w, w).ravel(), device=mu.device)  # (m^2,) float64
    recon = (ww * _log_lik(model, x1, z, max_chunk_elems)).sum()
    return float(recon - kl_per_dim(mu.double(), logvar.double()).sum())


def _mixture_log_w(model: VAE, x1: torch.Tensor, comps: list[tuple[torch.Tensor, torch.Tensor]], m: int,
                   generator: torch.Generator, dtype: torch.dtype, max_chunk_elems: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """m draws from each Gaussian (mean, full covariance) of an equal mixture; their points (M, 2) and log
    weights log p(x, z) - log mixture(z) (M,), float64 (deterministic-mixture weights, Owen & Zhou 2000)."""
    dists = [torch.distributions.MultivariateNormal(mean, covariance_matrix=cov) for mean, cov in comps]
    eps = torch.randn(len(comps), m, 2, generator=generator, dtype=torch.float64)
    z = torch.cat([d.loc + e @ d.scale_tril.T for d, e in zip(dists, eps)])  # (len(comps) * m, 2)
    log_mix = torch.logsumexp(torch.stack([d.log_prob(z) for d in dists]), 0) - math.log(len(comps))
    return z, _log_joint(model, x1, z.to(dtype), max_chunk_elems) - log_mix


@torch.no_grad()
def _log_px_importance(model: VAE, x1: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, samples: int,
                       generator: torch.Generator, max_chunk_elems: int) -> tuple[float, float, float]:
    """log p(x) by importance sampling without the grid: (estimate, standard error, effective sample size).

    Two stages (adaptive importance sampling, Cappé et al. 2004). A quarter of the draws come from an
    equal mixture of the prior N(0, I), q(z|x) and q widened 3x; a Gaussian is fitted to their
    weighted draws. The estimate then uses only the rest, drawn from the prior, q, and that fit
    widened 1.5x and 3x. The prior's share bounds every weight by 4 p(x|z), so the estimate stays
    sound where q and the fit miss the posterior; the fit makes it efficient where the posterior is
    far narrower than q. The standard error is the delta method's, std(w) / (mean(w) sqrt(S)),
    trustworthy only with a large enough effective sample size (Kong 1992), which the check demands.
    """
    dtype = mu.dtype
    mu, var = mu.double(), logvar.double().exp()
    eye = torch.eye(2, dtype=torch.float64)
    prior, q = (torch.zeros(2, dtype=torch.float64), eye), (mu, torch.diag(var))
    first = max(3, samples // 4)
    z, log_w = _mixture_log_w(model, x1, [prior, q, (mu, torch.diag(9 * var))], first // 3, generator, dtype,
                              max_chunk_elems)
    w = torch.softmax(log_w, 0)[:, None]  # (M, 1)
    m = (w * z).sum(0)
    cov = (w * (z - m)).T @ (z - m) + 1e-6 * eye  # (2, 2) weighted covariance, jittered to stay positive
    comps = [prior, q, (m, 2.25 * cov), (m, 9 * cov)]
    _, log_w = _mixture_log_w(model, x1, comps, max(1, (samples - first) // len(comps)), generator, dtype,
                              max_chunk_elems)
    n = len(log_w)
    w = (log_w - log_w.max()).exp()  # scaled weights, the largest is 1
    est = float(torch.logsumexp(log_w, 0) - math.log(n))
    se = float(w.std() / w.mean() / math.sqrt(n))
    ess = float(w.sum() ** 2 / (w * w).sum())
    return est, se, ess


def _span_box(span: float | Box) -> Box:
    if isinstance(span, (int, float)):
        if not span > 0:
            raise ValueError(f"span must be positive; got {span!r}")
        return ((-float(span), float(span)),) * 2  # type: ignore[return-value]
    (a, b), (c, d) = span
    if not (a < b and c < d):
        raise ValueError(f"span must be ((z1_low, z1_high), (z2_low, z2_high)) with low < high; got {span!r}")
    return ((float(a), float(b)), (float(c), float(d)))


@torch.no_grad()
def posterior_grid(model: VAE, x_single: torch.Tensor, *, n: int = 200, span: float | Box | None = None,
                   reference_samples: int = REFERENCE_SAMPLES, seed: int = 0,
                   max_chunk_elems: int = CHUNK_ELEMS) -> PosteriorGrid:
    """The true posterior of one example on an n x n grid placed where its mass is; 2-latent models only.

    span=None finds the box by coarse passes (see _locate) and joins q's mean +- 6 std, so both
    the posterior and q lie inside; a number s fixes the box to [-s, s]^2, a pair of ranges to
    those ranges. Costs about n^2 + 2 * 48^2 decoder passes, plus 48^2 + 32^2 for the grid-free ELBO
    and reference_samples for the grid-free log p(x) (0 skips both, and so the checks; seed fixes the
    draws).
    """
    if reference_samples < 0:
        raise ValueError(f"reference_samples must be >= 0; got {reference_samples}")
    _check_two_latents(model)
    if n < 8:
        raise ValueError(f"n must be at least 8 points per axis; got {n}")
    x1 = _one_example(x_single)
    mu, logvar = (t[0] for t in model.encode(x1))  # (2,)
    std = torch.exp(0.5 * logvar)
    half = (std * Q_STD_COVER).clamp(max=Q_HALF_WIDTH_MAX)
    q_box: Box = tuple((float(m - h), float(m + h)) for m, h in zip(mu, half))  # type: ignore[assignment]
    box = _span_box(span) if span is not None else _locate(model, x1, q_box, mu, max_chunk_elems)

    a1, a2 = _axes(box, n, mu)
    z = _points(a1, a2)  # (n^2, 2)
    log_joint = _log_joint(model, x1, z, max_chunk_elems)  # (n^2,) log p(x|z) + log p(z)
    log_dA = math.log((box[0][1] - box[0][0]) / n) + math.log((box[1][1] - box[1][0]) / n)
    log_px = torch.logsumexp(log_joint, 0) + log_dA  # log of the integral of p(x, z) over the grid
    log_post = log_joint - log_px  # log p(z|x), (n^2,)
    log_q = log_normal(z.double(), mu.double(), logvar.double())  # (n^2,)
    q_w = torch.softmax(log_q, 0)  # q's cell weights, normalised on the grid
    elbo = (q_w * (log_joint - log_q)).sum()  # E_q[log p(x, z) - log q(z|x)]
    kl = (q_w * (log_q - log_post)).sum()  # KL(q(z|x) || p(z|x))

    post = (log_post + log_dA).exp().view(n, n)  # cell masses, sum to 1
    edge = post[0].sum() + post[-1].sum() + post[1:-1, 0].sum() + post[1:-1, -1].sum()
    p, zd = post.flatten()[:, None], z.double()  # (n^2, 1), (n^2, 2)
    post_std = ((p * zd.pow(2)).sum(0) - (p * zd).sum(0).pow(2)).clamp(min=0).sqrt()  # (2,)
    cell = torch.tensor([(hi - lo) / n for lo, hi in box], dtype=torch.float64, device=zd.device)
    cells_per_std = float((torch.minimum(post_std, std.double()) / cell).min())
    nan = float("nan")
    if reference_samples:
        gh = _elbo_gauss_hermite(model, x1, mu, logvar, max_chunk_elems)
        gh_error = abs(gh - _elbo_gauss_hermite(model, x1, mu, logvar, max_chunk_elems, GAUSS_HERMITE_COARSE))
        ref = _log_px_importance(model, x1, mu, logvar, reference_samples, torch.Generator().manual_seed(seed),
                                 max_chunk_elems)
    else:  # the training loop's evidence rows: no checks, so none of their cost
        gh, gh_error, ref = nan, nan, (nan, nan, 0.0)
    return PosteriorGrid(
        z1=a1.double().cpu().numpy(), z2=a2.double().cpu().numpy(),
        log_density=log_post.view(n, n).cpu().numpy(),
        q_mu=mu.double().cpu().numpy(), q_cov=np.diag(logvar.double().exp().cpu().numpy()),
        log_px=float(log_px), elbo=float(elbo), kl_to_posterior=float(kl),
        elbo_reference=gh, elbo_reference_error=gh_error,
        log_px_reference=ref[0], log_px_reference_se=ref[1], log_px_reference_ess=ref[2],
        cell_area=math.exp(log_dA), posterior_edge_mass=float(edge),
        q_grid_mass=float(torch.logsumexp(log_q, 0).add(log_dA).exp()), cells_per_std=cells_per_std,
    )


@dataclass(frozen=True)
class GridCheck:
    """One number of the grid against an estimate that does not use the grid, with the tolerance it must meet."""

    name: str  # what is compared, e.g. "ELBO"
    grid: float
    reference: float
    tolerance: float  # nats
    method: str  # how the reference was computed, one line for a person
    verdict: str  # "pass", "fail", or "inconclusive" (the reference is too uncertain to judge)
    why: str  # the verdict in words, with the numbers

    @property
    def difference(self) -> float:
        return self.grid - self.reference


def grid_checks(g: PosteriorGrid) -> list[GridCheck]:
    """The checks a grid can fail: its ELBO against Gauss-Hermite, its log p(x) against importance sampling.

    Pure arithmetic on the grid's fields, so a wrong log_px or ELBO (a perturbed grid) fails here.
    """
    out: list[GridCheck] = []
    if not math.isfinite(g.elbo_reference):  # computed without references (reference_samples = 0)
        return out
    d = g.elbo - g.elbo_reference
    tol = ELBO_TOL + g.elbo_reference_error
    ok = abs(d) <= tol
    out.append(GridCheck("ELBO", g.elbo, g.elbo_reference, tol,
                         f"Gauss–Hermite quadrature ({GAUSS_HERMITE_NODES}² nodes on q's axes) minus the closed-form "
                         "KL(q(z|x) ‖ p(z))", "pass" if ok else "fail",
                         f"differ by {abs(d):.1e} nats, {'within' if ok else 'outside'} the tolerance of {tol:.3f} "
                         f"({ELBO_TOL:g} + the reference's own error, {g.elbo_reference_error:.1e}, its distance from "
                         f"{GAUSS_HERMITE_COARSE}² nodes)"))
    if math.isfinite(g.log_px_reference):
        tol = LOG_PX_TOL + LOG_PX_SE_MULT * g.log_px_reference_se
        d = g.log_px - g.log_px_reference
        method = (f"importance sampling from a mixture of p(z), q(z|x) and a Gaussian fitted to a first round of "
                  f"draws (effective sample size {g.log_px_reference_ess:,.0f})")
        if abs(d) > tol:
            verdict = "fail"
        elif g.log_px_reference_ess < MIN_ESS:
            verdict = "inconclusive"
        else:
            verdict = "pass"
        why = (f"differ by {abs(d):.1e} nats, {'within' if abs(d) <= tol else 'outside'} the tolerance of {tol:.3f} "
               f"({LOG_PX_TOL:g} + {LOG_PX_SE_MULT:g} standard errors of {g.log_px_reference_se:.1e})")
        if verdict == "inconclusive":
            why += f"; but the effective sample size is under {MIN_ESS:g}, so the reference is too uncertain to judge"
        out.append(GridCheck("log p(x)", g.log_px, g.log_px_reference, tol, method, verdict, why))
    return out


@torch.no_grad()
def grid_evidence(model: VAE, x_batch: torch.Tensor, *, n: int = 100, reference_samples: int = 0) -> dict[str, Any]:
    """The grid log p(x), KL(q || p(z|x)) and ELBO over a batch, nats per example; 2 latents.

    Means over the batch, and each example's log p(x) and ELBO (``*_each``), so a reader can see
    which examples a bound misses rather than only the mean. With reference_samples > 0 every grid
    is also checked (grid_checks) and ``grid_checks_failed`` lists the examples that fail.
    One posterior_grid per example: each grid sits where that example's posterior is, and its
    n^2 points already make a full-size decoder batch, so stacking examples would gain little.
    Costs ~(n^2 + 2 * 48^2) decoder passes per example (+ 3300 + reference_samples to check); for the default
    MLP (hidden 400) on 2 CPU cores about 0.06 s at n = 64, 0.1 s at n = 100 and 0.3 s at n = 200.
    """
    _check_two_latents(model)
    grids = [posterior_grid(model, x_batch[i], n=n, reference_samples=reference_samples, seed=i)
             for i in range(len(x_batch))]
    out: dict[str, Any] = {
        "log_px_grid": float(np.mean([g.log_px for g in grids])),
        "kl_to_posterior_grid": float(np.mean([g.kl_to_posterior for g in grids])),
        "elbo_grid": float(np.mean([g.elbo for g in grids])),
        "log_px_grid_each": [g.log_px for g in grids], "elbo_grid_each": [g.elbo for g in grids]}
    if reference_samples:
        out["grid_checks_failed"] = [i for i, g in enumerate(grids)
                                     if any(c.verdict == "fail" for c in grid_checks(g))]
    return out


def far_below(log_px: Sequence[float], bound: Sequence[float], nats: float = IWAE_FAR_NATS) -> list[int]:
    """Indices of the examples whose bound lies more than `nats` below their log p(x)."""
    return [i for i, (a, b) in enumerate(zip(log_px, bound)) if b < a - nats]


# ---------------------------------------------------------------- how the latent space is used

@torch.no_grad()
def encode_means(model: VAE, x: torch.Tensor, batch: int = 1000) -> np.ndarray:
    """E_q[z|x] for every example, (N, D), encoded in batches."""
    return torch.cat([model.encode(x[i:i + batch])[0] for i in range(0, len(x), batch)]).cpu().numpy()


def active_units(kl_per_dim: np.ndarray | Sequence[float], threshold: float = ACTIVE_THRESHOLD) -> tuple[int, np.ndarray]:
    """Dimension d is active when its mean KL(q(z_d|x) || p(z_d)) exceeds `threshold` nats (records.active_mask).

    kl_per_dim: (D,) nats, averaged over examples (kl_per_dimension, or the trainer's test rows).
    Returns the count and the (D,) boolean mask.
    """
    kl = np.asarray(kl_per_dim, dtype=np.float64)
    if kl.ndim != 1 or kl.size == 0:
        raise ValueError(f"active_units needs the per-dimension KL, shape (D,); got {kl.shape}")
    mask = np.array(active_mask(kl.tolist(), threshold))
    return int(mask.sum()), mask


@torch.no_grad()
def kl_per_dimension(model: VAE, x: torch.Tensor, batch: int = 1000) -> np.ndarray:
    """Closed-form KL(q(z_d|x) || N(0, 1)) per dimension, mean over examples, (D,) nats."""
    total = None
    for i in range(0, len(x), batch):
        mu, logvar = model.encode(x[i:i + batch])
        s = kl_per_dim(mu.double(), logvar.double()).sum(0)  # (D,)
        total = s if total is None else total + s
    if total is None:
        raise ValueError("kl_per_dimension needs at least one example")
    return (total / len(x)).cpu().numpy()
