"""The Evidence tab through AppTest, on small trained runs: every section renders, the numbers are the core's.

The panel runs in-process against runs trained here by a Lab (AppTest passes the run's handle
to the script function); the panel itself reaches the server's Lab (dashboard.state.get_lab,
over the same runs directory) for background jobs and remedies. run_every never fires in
AppTest and background jobs are not awaited, so the on-demand estimate is polled with at.run()
against a deadline.
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from dashboard.panels import evidence_kl, evidence_posterior, evidence_series
from dashboard.state import get_lab
from vae_core.lab import Lab, RunConfig, RunHandle

K = evidence_series.K


def _script(run):
    from dashboard.panels import evidence

    evidence.render(run)


def _config(latent_dim: int, **kw) -> RunConfig:
    return RunConfig().replace(**{"epochs": 2, "train_size": 512, "hidden_dim": 64, "batch_size": 64,
                                  "evidence_every": 1, "latent_dim": latent_dim, **kw})


def finish(run: RunHandle, timeout: float = 120.0) -> RunHandle:
    """Wait for a run of this process to end, and check that it finished."""
    run.join(timeout)
    assert run.status().state == "finished", run.status().message
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Finished 2-epoch runs 'z2' and 'z5' (2 and 5 latents) with evidence rows after each epoch, and 'g5', a
    5-latent run with a Gaussian likelihood on grey levels (key "g")."""
    lab = Lab(tmp_path_factory.mktemp("evidence") / "runs", num_threads=1, max_runs=3)
    started = {d: lab.start(_config(d), name=f"z{d}") for d in (2, 5)}
    started["g"] = lab.start(_config(5, likelihood="gaussian-fixed", binarize=False), name="g5")
    yield {d: finish(run) for d, run in started.items()}
    lab.shutdown()


@pytest.fixture(autouse=True)
def server_lab(trained, monkeypatch):
    """The server's Lab (what the panel's get_lab() returns) over the trained runs' directory; cleared after."""
    monkeypatch.setenv("VAE_RUNS_DIR", str(trained[2].run_dir.parent))
    yield
    get_lab().shutdown()
    st.cache_resource.clear()
    st.cache_data.clear()


def app(run: RunHandle) -> AppTest:
    at = AppTest.from_function(_script, args=(run,), default_timeout=30)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def chart(at: AppTest, key: str) -> dict:
    for c in at.get("plotly_chart"):
        spec = json.loads(c.proto.spec)
        if c.proto.id.endswith(key) or key in c.proto.id:
            return spec
    raise KeyError(key)


def values(a) -> np.ndarray:
    """A Plotly JSON array: a plain list, or a typed array {"bdata": base64, "dtype": ...}."""
    if isinstance(a, dict) and "bdata" in a:
        import base64

        out = np.frombuffer(base64.b64decode(a["bdata"]), dtype=a["dtype"])
        return out.reshape(a["shape"]) if "shape" in a else out
    return np.asarray(a, dtype=float)


def page_text(at: AppTest) -> str:
    return " ".join([m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info]
                    + [w.value for w in at.warning] + [s.value for s in at.success])


# ------------------------------------------------------------------ rendering

def compute_grid(at: AppTest) -> AppTest:
    """Press 'Compute the true posterior' (the grid is computed only when asked)."""
    at.button(key=K + "grid_go").click().run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def test_two_latents_cheap_sections_first_and_the_grid_on_request(trained):
    t = trained[2]
    at = app(t)
    assert [h.value for h in at.subheader] == ["ELBO vs log p(x) during training", "What the KL term is doing",
                                               "The true posterior p(z|x)"]
    assert not any("posterior" == c.proto.id.rsplit("-", 1)[-1] for c in at.get("plotly_chart"))
    assert not any(key.endswith("posterior") for key in (c.proto.id for c in at.get("plotly_chart")))
    assert at.button(key=K + "grid_go") and "Computed only when asked" in page_text(at)
    expanders = [e.label for e in at.expander]
    assert any(x.startswith("Why the ELBO is a lower bound") for x in expanders)
    assert any("ELBO ≥ log p(x), which is wrong" in x for x in expanders)

    compute_grid(at)
    text = page_text(at)
    assert "Identity check" not in text
    # The numbers shown are the core's, for the run's first held-out image at the default 200 x 200 grid, pinned
    # to the weights of the click.
    g = evidence_posterior.posterior(t, t.token, t.weights_version(), 0, 200).grid
    assert len(g.z1) == 200 and g.kl_to_posterior >= 0
    checks = g.checks()
    assert [c.verdict for c in checks] == ["pass", "pass"]
    for c in checks:
        assert f"✓ pass · {c.name}: grid {c.grid:.4f} vs {c.reference:.4f}" in text
    assert not at.error
    latex = " ".join(x.value for x in at.get("latex"))
    assert f"{g.log_px:.3f} \\;=\\; ({g.elbo:.3f}) + {g.kl_to_posterior:.3f}" in latex
    assert r"\le" in latex and r"\ge" not in latex.replace(r"\mathrm{KL} \ge 0", "")  # ELBO ≤ log p(x), never ≥
    assert "The inequality is the other way round" in text and "You do not need them" in text
    # Over training: ELBO, best bound and the shaded gap; with 2 latents a quadrature panel too.
    spec = chart(at, "over_training")
    names = {d.get("name") for d in spec["data"]}
    assert {"ELBO", "gap ≈ KL(q(z|x) ‖ p(z|x))", "log p(x) by quadrature", "KL(q ‖ p(z|x)) by quadrature"} <= names
    assert spec["layout"]["yaxis"]["title"]["text"] == "nats per example"
    last = [r for r in t.metrics() if r["split"] == "evidence"][-1]
    bound_trace = next(d for d in spec["data"] if str(d.get("name", "")).startswith("log p̂ₖ(x), k = 1000"))
    assert values(bound_trace["y"])[-1] == pytest.approx(last["iwae"][-1])
    # The k chart's error bars are the paired errors of each rise, and say so.
    k_spec = chart(at, "vs_k")
    assert k_spec["layout"]["xaxis"]["type"] == "log"
    assert values(k_spec["data"][0]["error_y"]["array"]) == pytest.approx(last["iwae_step_se"])
    assert "paired by image" in text and "every k shares it" in text
    # Each grid image's gap, with the far ones flagged, as the row has them.
    per = chart(at, "per_image")
    gaps = values(per["data"][1]["y"])
    n = len(last["log_px_grid_each"])
    assert gaps == pytest.approx([a - b for a, b in zip(last["log_px_grid_each"], last["iwae_each"][:n])])
    far = [i for i, gap in enumerate(gaps) if gap > 1.0]
    assert (f"On {len(far)} of {n} images" in text) if far else ("within 1 nats of log p(x)" in text)
    assert "Bernoulli log-likelihood of binarized images" in text  # the units line names the likelihood
    heat = chart(at, "posterior")
    assert heat["data"][0]["type"] == "heatmap"
    assert sum("σ" in str(d.get("name", "")) for d in heat["data"]) == 2  # the 1σ and 2σ ellipses of q


def test_a_failing_check_is_shown_as_a_failure(trained, monkeypatch):
    """Feed the panel a grid whose log p(x) is wrong: the page must say FAIL, not pass."""
    import dataclasses

    t = trained[2]
    real = evidence_posterior.posterior

    def wrong(run, token, version, index, n):
        r = real(run, token, version, index, n)
        g = dataclasses.replace(r.grid, log_px=r.grid.log_px + 0.5, kl_to_posterior=r.grid.kl_to_posterior + 0.5)
        return dataclasses.replace(r, grid=g)

    monkeypatch.setattr(evidence_posterior, "posterior", wrong)
    at = compute_grid(app(t))
    errors = " ".join(e.value for e in at.error)
    assert "✗ FAIL · log p(x)" in errors and "outside the tolerance" in errors
    assert "✓ pass · ELBO" in page_text(at)


def test_gaussian_units_name_the_gaussian(trained):
    at = app(trained["g"])
    text = page_text(at)
    assert "Gaussian (fixed σ) log-density of grey levels" in text
    assert "BCE" not in text and "not a log-likelihood" not in text


def test_five_latents_explain_the_grid_and_use_the_bounds(trained):
    at = app(trained[5])
    text = page_text(at)
    assert "integrated on a grid only in 2" in text and "importance-weighted bounds above are lower bounds" in text
    assert not any(c.proto.id.endswith("posterior") for c in at.get("plotly_chart"))
    assert "can understate log p(x)" in text or "stay many nats below" in text
    latex = " ".join(x.value for x in at.get("latex"))
    last = [r for r in trained[5].metrics() if r["split"] == "evidence"][-1]
    assert f"{last['iwae'][-1]:.3f} \\;\\approx\\; ({last['elbo']:.3f})" in latex
    heat = chart(at, "kl_dims")
    assert len(heat["data"][0]["y"]) == 5 and heat["data"][0]["colorbar"]["title"]["text"] == "nats"
    rd = chart(at, "rd")
    assert "nats per example" in rd["layout"]["xaxis"]["title"]["text"]


def test_image_navigation_and_grid_size(trained):
    at = compute_grid(app(trained[2]))
    at.button(key=K + "image_next").click().run()
    assert at.number_input(key=K + "image").value == 1
    assert "test image 1, by quadrature" in page_text(at)
    at.slider(key=K + "grid_n").set_value(60).run()
    assert len(values(chart(at, "posterior")["data"][0]["x"])) == 60
    assert "60 × 60 grid" in page_text(at)
    at.radio(key=K + "grid_view").set_value("log p(z|x)").run()
    assert not at.exception and "log p(z|x)" in json.dumps(chart(at, "posterior")["data"][0]["colorbar"])


# ------------------------------------------------------------------ estimate now

def test_estimate_now_runs_in_the_background_and_shows_its_result(trained):
    t = trained[5]
    at = app(t)
    at.select_slider(key=K + "job_k").set_value(100)
    at.select_slider(key=K + "job_n").set_value(32)
    at.button(key=K + "job_start").click().run()
    deadline = time.monotonic() + 20
    while "On 32 held-out images" not in page_text(at):
        assert time.monotonic() < deadline, page_text(at)
        time.sleep(0.2)
        at.run()
        assert not at.exception
    # The job can end between the k chart's draw and the progress line's in one run: one more run draws both.
    at.run()
    job = get_lab().bounds_job(t.name)
    assert job.state == "done" and job.progress == 1.0 and job.ks == (1, 10, 100)
    assert f"{job.result['iwae'][-1]:.2f}" in page_text(at)
    names = [d.get("name", "") for d in chart(at, "vs_k")["data"]]
    assert any(n.startswith("on demand") for n in names)
    assert at.button(key=K + "job_start")  # the button is back for another estimate


# ------------------------------------------------------------------ collapse remedies

def test_remedies_apply_to_an_active_run():
    t = get_lab().start(_config(2, epochs=500, evidence_every=0), name="active")  # no owner: anyone steers it
    try:
        at = AppTest.from_function(_script, args=(t,), default_timeout=30)
        deadline = time.monotonic() + 30
        while True:
            at.run()
            assert not at.exception
            if t.weights_version() > 0 and [r for r in t.metrics() if r["split"] == "test"]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        at.run()
        at.button(key=K + "remedy_free_bits").click().run()
        assert t.status().free_bits == 0.5
        at.button(key=K + "remedy_beta").click().run()
        assert t.status().beta == 0.5
        epoch = t.status().epoch
        at.button(key=K + "remedy_warmup").click().run()
        w = t.status().warmup_epochs
        assert w >= math.ceil(epoch) + 5
        assert any("Applied from the next step" in s.value for s in at.success)
        assert not at.exception
    finally:
        get_lab().stop(t.name, wait=10)
    at.run()
    # Stopped, the remedies offer what works for a run that is not training (never a disabled "Resume it").
    assert at.radio(key=K + "remedy_target").options == [evidence_kl.TARGETS["more"], evidence_kl.TARGETS["fork"]]
    assert "Resume it" not in page_text(at)


def test_remedies_on_a_finished_run_fork_it_or_train_it_on():
    lab = get_lab()
    t = lab.start(_config(2, epochs=1, evidence_every=0), name="ended")
    deadline = time.monotonic() + 120
    while t.status().state != "finished":
        assert time.monotonic() < deadline and t.status().state in ("queued", "running"), t.status()
        time.sleep(0.2)
    at = app(t)
    assert not any(at.button(key=K + f"remedy_{n}").disabled for n in ("warmup", "free_bits", "beta"))
    before = {r.name for r in lab.list_runs()}
    at.radio(key=K + "remedy_target").set_value("fork").run()
    at.button(key=K + "remedy_beta").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (child,) = {r.name for r in lab.list_runs()} - before
    assert lab.open(child).config.train.beta == 0.5 or lab.open(child).status().beta == 0.5
    assert t.status().state == "finished" and t.status().beta == 1.0  # the parent stays as it was
    assert any(f"Forked as {child}" in s.value for s in at.success)
    lab.stop(child, wait=10)

    at.radio(key=K + "remedy_target").set_value("more").run()
    at.button(key=K + "remedy_free_bits").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    try:
        assert t.status().free_bits == 0.5
        assert t.status().state in ("queued", "running", "finished") and t.status().epochs_target == 2
        assert any("Training ended on from its checkpoint" in s.value for s in at.success)
    finally:
        lab.stop(t.name, wait=10)


def test_remedies_are_only_for_the_session_that_steers_the_run():
    t = get_lab().start(_config(2, epochs=500, evidence_every=0), name="theirs", owner="another-tab")
    try:
        at = AppTest.from_function(_script, args=(t,), default_timeout=30)
        deadline = time.monotonic() + 60
        while True:
            at.run()
            assert not at.exception
            if t.weights_version() > 0 and at.get("button"):
                break
            assert time.monotonic() < deadline, t.status()
            time.sleep(0.2)
        assert t.status().state == "running"
        assert all(at.button(key=K + f"remedy_{n}").disabled for n in ("warmup", "free_bits", "beta"))
        assert "belongs to another session" in page_text(at)
        beta = t.status().beta
        evidence_kl._apply(t, "beta")  # even a forged click changes nothing: the Lab checks the owner
        assert t.status().beta == beta
    finally:
        get_lab().stop(t.name, owner="another-tab", wait=10)


# ------------------------------------------------------------------ pure pieces

def test_collapse_signs():
    test = [{"epoch": 1, "kl": 3.0, "active_units": 4}, {"epoch": 2, "kl": 2.0, "active_units": 4}]
    assert evidence_series.collapse_signs(test, [], 5) == []
    test.append({"epoch": 3, "kl": 0.3, "active_units": 2})
    signs = evidence_series.collapse_signs(test, [], 5)
    assert len(signs) == 3 and "0.30 nats" in signs[0] and "fell from 4 of 5 (epoch 1) to 2" in signs[2]
    assert "3 of 5 dimensions are collapsed after epoch 3" in signs[1]
    # The count follows the per-dimension KL the heatmap draws, whatever count the row was logged with.
    row = {"epoch": 1, "kl": 2.0, "active_units": 4, "kl_per_dim": [1.5, 0.3, 0.05, 0.1, 0.05]}
    assert evidence_series.active_count(row) == 2
    assert "3 of 5 dimensions are collapsed" in evidence_series.collapse_signs([row], [], 5)[0]
    train = [{"kl": 0.1}] * 5
    assert "last training steps" in evidence_series.collapse_signs(test[:2], train, 5)[0]


def test_beta_8_most_dimensions_collapse_and_every_part_of_the_tab_says_so():
    """Issue 16 bug 8: '16/16 active' and 'No sign of collapse' beside a heatmap of near-zero dimensions."""
    from vae_core.lab import ACTIVE_THRESHOLD

    t = finish(get_lab().start(_config(16, beta=8.0, lr=1e-3, epochs=1, train_size=1024, evidence_every=0), name="b8"))
    row = [r for r in t.metrics() if r["split"] == "test"][-1]
    collapsed = sum(v <= ACTIVE_THRESHOLD for v in row["kl_per_dim"])
    assert collapsed > 8, row["kl_per_dim"]  # the configuration does what this test needs: most dimensions collapse
    assert row["active_units"] == 16 - collapsed  # the trainer counts by the same rule
    at = app(t)
    text = page_text(at)
    assert "No sign of posterior collapse" not in text and "Posterior collapse?" in text
    assert f"{collapsed} of 16 dimensions are collapsed" in text
    heat = chart(at, "kl_dims")
    assert sum("(off)" in y for y in heat["data"][0]["y"]) == collapsed
    active = chart(at, "active")
    assert values(active["data"][0]["y"])[-1] == 16 - collapsed


def test_warmup_remedy_ramps_from_now(trained):
    s = trained[2].status()  # finished at epoch 2, beta 1
    r = evidence_kl.remedies(s)
    assert r["warmup"].changes == {"warmup_epochs": 7.0} and "2.0/7" in r["warmup"].effect
    assert "ends at epoch 2, before the ramp" in r["warmup"].effect
    assert r["beta"].changes == {"beta": 0.5} and r["free_bits"].changes == {"free_bits": 0.5}
    assert all(x.unavailable is None for x in r.values())


def test_rate_distortion_iso_lines_pass_through_the_latest_point(trained):
    t = trained[2]
    rows = evidence_series.split_rows(t.metrics())
    fig = evidence_kl.rd_figure(rows.test, rows.train, t.status(), "nats per example")
    r0, d0 = rows.train[-1]["kl"], -rows.train[-1]["recon"]
    for name in ("ELBO iso-line", "β-objective iso-line"):
        line = next(d for d in fig.data if d.name.startswith(name))
        assert np.interp(r0, line.x, line.y) == pytest.approx(d0)
    beta_line = next(d for d in fig.data if d.name.startswith("β-objective"))
    slope = (beta_line.y[-1] - beta_line.y[0]) / (beta_line.x[-1] - beta_line.x[0])
    assert slope == pytest.approx(-t.status().beta_effective)


def test_opened_run_renders(trained):
    opened = get_lab().open("z2")  # this server did not train it: a handle following its files
    assert opened.status().followed and opened.weights_version() > 0
    at = compute_grid(app(opened))
    assert "✓ pass · log p(x)" in page_text(at)
    assert chart(at, "over_training")
    at.button(key=K + "job_start").click().run()  # the server's Lab evaluates a run it only follows
    deadline = time.monotonic() + 60
    while "held-out images, weights from step" not in page_text(at):
        assert time.monotonic() < deadline, page_text(at)
        time.sleep(0.2)
        at.run()
        assert not at.exception
