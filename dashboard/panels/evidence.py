"""The Evidence tab: why the ELBO is a lower bound on log p(x), shown with the running model's numbers.

    log p(x) = ELBO(x) + KL(q(z|x) ‖ p(z|x)),  so  ELBO ≤ log p(x)  (Kingma & Welling 2019, eq. 2.8)

Drawn cheapest first, so the page fills at once even while a run trains: the bounds over
training and what the KL term does (both only read the run's metric rows; evidence_bounds,
evidence_kl), then the true posterior of one test image, which costs a grid of decoder passes
and is computed only when asked (evidence_posterior), and last the derivation and the note on
the course's inequality, folded in expanders. Live parts are fragments that poll only while the
run is active; everything reads the run's published metrics and CPU weights (a RunHandle:
trained here, or followed from another process's files), so the tab works during training,
after it, and for a run opened from disk.
"""
from __future__ import annotations

import streamlit as st

from dashboard.panels import evidence_bounds, evidence_kl, evidence_posterior
from vae_core.lab import RunHandle


def render(run: RunHandle) -> None:
    """The Evidence tab for `run` (called once it has published weights)."""
    if run.weights_version() == 0:
        st.info("This run has no weights yet: they appear a moment after training starts.")
        return
    st.markdown("For any encoder q(z|x), **log p(x) = ELBO + KL(q(z|x) ‖ p(z|x))**. The KL is never negative, so "
                "**ELBO ≤ log p(x)**: the objective the VAE maximises is a lower bound on the log-likelihood, and the "
                "gap is exactly how far q(z|x) is from the true posterior p(z|x). This tab measures both sides.")
    st.subheader("ELBO vs log p(x) during training")
    evidence_bounds.render(run)
    st.subheader("What the KL term is doing")
    evidence_kl.render(run)
    evidence_posterior.render(run)
