"""The Experiments tab: three guided experiments for a class, each predict → run → see → explain.

Each experiment is a few short runs on the built-in sprites, started through the Lab as Train
starts a run (the first becomes this session's shown run, so the sidebar takes its settings and
the Training tab shows it live). A follow-on phase (β raised to 8) is a fork the Lab starts by
itself when its parent finishes, so it goes on while the learner watches another tab. The
outcome is read from the runs' own test rows (metrics.jsonl), and the two sentences of
explanation are chosen by those numbers: where a run did not show the expected effect, the
text says so instead of reciting the textbook.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard.common import md_text, reconstructions_mosaic
from dashboard.state import session_id
from vae_core.lab import ACTIVE_THRESHOLD, Lab, RunConfig, RunFileError, UserError

TITLE = "Experiments"
K = "exp_"  # every widget key starts with this
POLL_S = 1.0
# Every run: the built-in sprites (no download), a mid-sized MLP and 8,192 training images, so one epoch
# takes ~5-15 s on a 2-core CPU and each experiment about a minute or two (docs/performance.md).
# VAE_EXPERIMENT_TRAIN_SIZE makes them shorter still (the browser test, a slow demo machine).
_SIZE = os.environ.get("VAE_EXPERIMENT_TRAIN_SIZE", "")
BASE: dict[str, Any] = {"dataset": "sprites", "train_size": int(_SIZE) if _SIZE.isdigit() and int(_SIZE) >= 16 else 8192, "hidden_dim": 256, "batch_size": 128, "lr": 3e-3,
                        "evidence_every": 0, "seed": 0, "latent_dim": 8, "beta": 1.0, "warmup_epochs": 0.0,
                        "free_bits": 0.0}
ACTIVE = ("idle", "queued", "running", "paused")
MATERIAL_NATS = 0.5  # a change smaller than this (nats per example) is reported as "no clear change"


@dataclass(frozen=True)
class Arm:
    """One run of an experiment: its settings (changes to BASE) and epochs; `after` forks it from another arm."""

    label: str
    changes: dict[str, Any]
    epochs: int
    after: str | None = None  # label of the arm this one continues (a fork with `changes` when that one finishes)


@dataclass(frozen=True)
class Outcome:
    """What the runs showed: a table, the choice the numbers support (None: none clearly) and two sentences."""

    rows: dict[str, list[Any]]
    supported: int | None
    sentences: tuple[str, str]


@dataclass(frozen=True)
class Experiment:
    key: str
    title: str
    intro: str
    question: str
    choices: tuple[str, ...]
    arms: tuple[Arm, ...]
    watch: str  # what to look at in the Training tab while it runs


def _f(v: float) -> str:
    return f"{v:.1f}"


def _change(a: float, b: float) -> int:
    """+1 when b is materially above a, -1 below, 0 within MATERIAL_NATS."""
    return 0 if abs(b - a) < MATERIAL_NATS else (1 if b > a else -1)


def beta_outcome(last: dict[str, dict[str, Any]]) -> Outcome:
    lo, hi = last["β = 1"], last["then β = 8"]
    rate, recon, au = _change(lo["kl"], hi["kl"]), _change(lo["recon"], hi["recon"]), hi["active_units"] - lo["active_units"]
    rows = {"": ["end of β = 1", "end of β = 8"], "rate KL(q‖p) (nats)": [_f(lo["kl"]), _f(hi["kl"])],
            "reconstruction E[log p(x|z)] (nats)": [_f(lo["recon"]), _f(hi["recon"])],
            "test ELBO (nats)": [_f(lo["elbo"]), _f(hi["elbo"])],
            "active units": [lo["active_units"], hi["active_units"]]}
    if rate < 0 and recon < 0:
        s1 = (f"In your run the rate fell from {_f(lo['kl'])} to {_f(hi['kl'])} nats and the reconstruction term from "
              f"{_f(lo['recon'])} to {_f(hi['recon'])}: at β = 8 each nat the code carries costs eight times as much, "
              "so the encoder sends less about each image and the decoder, knowing less, draws blurrier averages.")
        supported = 0
    elif rate > 0:
        s1 = (f"In your run the rate rose from {_f(lo['kl'])} to {_f(hi['kl'])} nats, the opposite of what β = 8 "
              "pushes for; the β = 1 phase was probably still far from converged, so try more epochs.")
        supported = 1
    else:
        s1 = (f"Your run did not show the effect clearly: the rate went from {_f(lo['kl'])} to {_f(hi['kl'])} nats "
              f"and the reconstruction term from {_f(lo['recon'])} to {_f(hi['recon'])}; a longer β = 8 phase "
              "usually shows it.")
        supported = 2 if rate == 0 and recon == 0 else None
    if au < 0:
        s2 = (f"Active units dropped from {lo['active_units']} to {hi['active_units']}: the dimensions that carried "
              f"least were the cheapest to give up, and their KL fell below {ACTIVE_THRESHOLD:g} nats, back to the prior.")
    else:
        s2 = (f"Active units did not drop ({lo['active_units']} → {hi['active_units']}): in this run β = 8 thinned "
              "what each dimension carries without switching any of them off completely.")
    return Outcome(rows, supported, (s1, s2))


def latents_outcome(last: dict[str, dict[str, Any]]) -> Outcome:
    two, many = last["2 latents"], last["16 latents"]
    gap = many["elbo"] - two["elbo"]
    rows = {"": ["2 latents", "16 latents"], "test ELBO (nats)": [_f(two["elbo"]), _f(many["elbo"])],
            "rate KL(q‖p) (nats)": [_f(two["kl"]), _f(many["kl"])],
            "reconstruction E[log p(x|z)] (nats)": [_f(two["recon"]), _f(many["recon"])],
            "active units": [f"{two['active_units']} of 2", f"{many['active_units']} of 16"]}
    if gap >= 1.0:
        s1 = (f"With 16 latents the test ELBO is {gap:.1f} nats higher ({_f(many['elbo'])} against {_f(two['elbo'])}): "
              f"the code carries more ({_f(many['kl'])} against {_f(two['kl'])} nats of rate) and the reconstruction "
              f"term gains more than that costs ({_f(many['recon'])} against {_f(two['recon'])}).")
        supported = 0
    elif gap <= -1.0:
        s1 = (f"In your run 2 latents scored higher ({_f(two['elbo'])} against {_f(many['elbo'])} nats): the larger "
              "model had not yet paid off in these few epochs, so the expected gap did not show.")
        supported = 2
    else:
        s1 = (f"The two ELBOs are within 1 nat ({_f(two['elbo'])} and {_f(many['elbo'])}): in your run the extra "
              "dimensions did not pay off yet.")
        supported = 1
    idle = 16 - many["active_units"]
    rest = "the other one stays" if idle == 1 else f"the other {idle} stay"
    s2 = (f"Only {many['active_units']} of the 16 dimensions are active (KL above {ACTIVE_THRESHOLD:g} nats); {rest} "
          "at the prior, where a dimension costs nothing, since the sprites vary in just five factors "
          "(shape, scale, rotation, x, y)." if idle > 0 else
          "All 16 dimensions are active in your run (KL above "
          f"{ACTIVE_THRESHOLD:g} nats each): none was left at the prior, though several may carry very little.")
    return Outcome(rows, supported, (s1, s2))


def collapse_outcome(last: dict[str, dict[str, Any]]) -> Outcome:
    plain, warm, free = last["plain"], last["KL warm-up"], last["free bits"]
    rows = {"": ["plain", "KL warm-up (1 epoch)", "free bits (0.5 nats)"],
            "active units (of 16)": [plain["active_units"], warm["active_units"], free["active_units"]],
            "rate KL(q‖p) (nats)": [_f(plain["kl"]), _f(warm["kl"]), _f(free["kl"])],
            "test ELBO (nats)": [_f(plain["elbo"]), _f(warm["elbo"]), _f(free["elbo"])]}
    a0, aw, af = plain["active_units"], warm["active_units"], free["active_units"]
    if af > a0:
        s1 = (f"Free bits kept {af} of 16 dimensions active against {a0} without: below 0.5 nats a dimension's KL "
              "costs nothing, so the optimiser has no reason to switch it off; the ELBO shows whether what they "
              f"carry is worth it ({_f(free['elbo'])} against {_f(plain['elbo'])} nats).")
    else:
        s1 = (f"Free bits did not keep more dimensions active in your run ({af} against {a0} without), so this run "
              "does not show that remedy working.")
    if aw > a0:
        s2 = (f"KL warm-up left {aw} active: with β near 0 at first the encoder learns to use its code before the "
              "KL is charged in full, and some of what it learned stays.")
    else:
        s2 = (f"KL warm-up made no difference here ({aw} against {a0}): what a dimension costs at the end (β = 4) "
              "decides, and one epoch of warm-up gave it little head start.")
    supported = 0 if max(af, aw) > a0 else (2 if min(af, aw) < a0 else 1)
    return Outcome(rows, supported, (s1, s2))


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(
        "beta", "A. Raise β from 1 to 8 during training",
        "Train 2 epochs at β = 1 (8 latents), then continue the same model 2 more epochs at β = 8 (a fork that "
        "starts by itself when the first phase ends). β weighs the KL term, the *rate*: how many nats the code "
        "carries about each image.",
        "What happens when β jumps to 8?",
        ("The rate falls and reconstructions blur (and fewer latent dimensions stay active)",
         "The rate rises and reconstructions get sharper",
         "Not much changes: β only rescales the loss"),
        (Arm("β = 1", {}, 2), Arm("then β = 8", {"beta": 8.0}, 2, after="β = 1")),
        "the KL curve and the reconstructions once the β = 8 phase starts"),
    Experiment(
        "latents", "B. 2 latents against 16",
        "Train two models for 3 epochs each, the same but for the latent size: 2 and 16 dimensions.",
        "How do their test ELBOs compare?",
        ("16 latents reach a clearly higher (better) ELBO", "About the same ELBO", "2 latents reach a higher ELBO"),
        (Arm("2 latents", {"latent_dim": 2}, 3), Arm("16 latents", {"latent_dim": 16}, 3)),
        "the ELBO curves, and the reconstructions of the 2-latent model"),
    Experiment(
        "collapse", "C. KL warm-up and free bits against posterior collapse",
        "At β = 4 with 16 latents, dimensions tend to collapse to the prior (they then carry nothing). Three runs of 2 "
        "epochs: plain; with a KL warm-up (β ramps from 0 over the first epoch); with free bits (the first 0.5 "
        "nats of each dimension's KL are free).",
        "Which keeps more latent dimensions active?",
        ("Warm-up or free bits keep more dimensions active than the plain run",
         "They make no difference", "They make more dimensions collapse"),
        (Arm("plain", {"latent_dim": 16, "beta": 4.0}, 2),
         Arm("KL warm-up", {"latent_dim": 16, "beta": 4.0, "warmup_epochs": 1.0}, 2),
         Arm("free bits", {"latent_dim": 16, "beta": 4.0, "free_bits": 0.5}, 2)),
        "the KL curve and the active units in the Evidence tab"),
)
OUTCOMES: dict[str, Callable[[dict[str, dict[str, Any]]], Outcome]] = {"beta": beta_outcome, "latents": latents_outcome, "collapse": collapse_outcome}


def config_of(arm: Arm) -> RunConfig:
    return RunConfig().replace(**{**BASE, **arm.changes, "epochs": arm.epochs})


# ------------------------------------------------------------------ running

def _runs_key(exp: Experiment) -> str:
    return K + exp.key + "_runs"


def _start(lab: Lab, exp: Experiment) -> None:
    """The Run button: start the arms (they train in turn when the server has fewer slots) and chain the forks."""
    sid = session_id()
    names: dict[str, str] = {}
    try:
        for arm in exp.arms:
            if arm.after is None:
                names[arm.label] = lab.start(config_of(arm), owner=sid, name=f"exp-{exp.key}-{_slug(arm.label)}").name
        for arm in exp.arms:
            if arm.after is not None:
                lab.after(names[arm.after], _fork_action(lab, sid, names[arm.after], arm))
    except UserError as e:
        st.session_state[K + exp.key + "_error"] = str(e)
        return
    st.session_state.pop(K + exp.key + "_error", None)
    st.session_state[_runs_key(exp)] = names
    lab.show(sid, names[exp.arms[0].label])  # the sidebar takes its settings; the Training tab shows it live


def _fork_action(lab: Lab, sid: str, parent: str, arm: Arm) -> Callable[[], None]:
    def act() -> None:
        child = lab.fork(parent, owner=sid, epochs=arm.epochs, **arm.changes)
        if lab.current_name(sid) == parent:  # the learner still watches the first phase: follow into the second
            lab.show(sid, child.name)
    return act


def _slug(label: str) -> str:
    """"then β = 8" -> "then-beta8": a run-name part."""
    words = "".join(c if c.isalnum() else " " for c in label.replace("β", "beta").replace(" = ", "")).split()
    return "-".join(words).lower()


def _reset(exp: Experiment) -> None:
    st.session_state.pop(_runs_key(exp), None)
    st.session_state.pop(K + exp.key + "_predict", None)


def resolve(lab: Lab, exp: Experiment, names: dict[str, str]) -> dict[str, str | None]:
    """Every arm's run name: started ones from the session, forks found by their parent (None until they exist)."""
    out: dict[str, str | None] = dict(names)
    for arm in exp.arms:
        if arm.after is not None and arm.label not in names:
            parent = out.get(arm.after)
            children = [r.name for r in lab.list_runs() if r.parent and r.parent.get("run") == parent]
            out[arm.label] = children[0] if children else None
    return out


def arm_state(lab: Lab, name: str | None) -> tuple[str, float]:
    if name is None:
        return "waiting", 0.0
    try:
        s = lab.open(name).status()
    except RunFileError:
        return "deleted", 0.0
    return s.state, s.progress


def last_test(lab: Lab, name: str) -> dict[str, Any] | None:
    """The run's last test row (per-epoch ELBO, rate, reconstruction, active units), from its metrics."""
    rows = [r for r in lab.open(name).metrics() if r.get("split") == "test"]
    return rows[-1] if rows else None


# ------------------------------------------------------------------ the tab

def render(lab: Lab) -> None:
    st.markdown("Three short experiments for a class. For each: read the setup, **predict** the outcome, **run** it "
                "(a minute or two on a CPU; the runs queue when the server trains others), **see** what your runs "
                "measured, and read why. The first run becomes the run this page shows, so the sidebar shows its "
                "settings and the Training tab its live curves.")
    titles = [e.title for e in EXPERIMENTS]
    choice = st.radio("Experiment", titles, key=K + "which", horizontal=False)
    experiment(lab, EXPERIMENTS[titles.index(choice)])


def experiment(lab: Lab, exp: Experiment) -> None:
    st.subheader(exp.title)
    st.markdown(exp.intro)
    names = st.session_state.get(_runs_key(exp))
    predicted = st.radio(f"**Predict:** {exp.question}", exp.choices, index=None, key=K + exp.key + "_predict",
                         disabled=names is not None)
    if names is None:
        st.button("Run the experiment", key=K + exp.key + "_run", type="primary", disabled=predicted is None,
                  on_click=_start, args=(lab, exp), help=None if predicted else "Make your prediction first")
        if predicted is None:
            st.caption("Make your prediction first; the Run button waits for it.")
        error = st.session_state.get(K + exp.key + "_error")
        if error:
            st.error(md_text(error))
        return
    arms = resolve(lab, exp, names)
    states = {label: arm_state(lab, name) for label, name in arms.items()}
    polling = any(s in ACTIVE or s == "waiting" for s, _ in states.values())
    progress(lab, exp, arms, states, polling)
    if not polling:
        outcome(lab, exp, arms, states, predicted)
    st.button("Start over", key=K + exp.key + "_reset", on_click=_reset, args=(exp,))


def progress(lab: Lab, exp: Experiment, arms: dict[str, str | None], states: dict[str, tuple[str, float]],
             polling: bool) -> None:
    @st.fragment(run_every=POLL_S if polling else None)
    def watch() -> None:
        now = {label: arm_state(lab, name) for label, name in resolve(lab, exp, st.session_state.get(
            _runs_key(exp), {})).items()}
        for arm in exp.arms:
            state, frac = now.get(arm.label, ("waiting", 0.0))
            name = arms.get(arm.label)
            where = f" · {md_text(name)}" if name else ""
            if state == "waiting":
                text = f"{arm.label}: starts when “{arm.after}” finishes"
            else:
                text = f"{arm.label}{where} · {state}"
            st.progress(frac if state != "finished" else 1.0, text=text)
        if polling and not any(s in ACTIVE or s == "waiting" for s, _ in now.values()):
            st.rerun()  # all ended: draw the outcome, and stop polling
        if polling:
            st.caption(f"While it runs, watch {exp.watch} in the **Training** tab.")

    watch()


def outcome(lab: Lab, exp: Experiment, arms: dict[str, str | None], states: dict[str, tuple[str, float]],
            predicted: str | None) -> None:
    bad = [f"{label} ({state})" for label, (state, _) in states.items() if state != "finished"]
    if bad:
        st.warning("Not every run finished, so there is no outcome to show: " + md_text(", ".join(bad)) +
                   ". Start over to run it again.")
        return
    last = {label: last_test(lab, name) for label, name in arms.items() if name}
    if any(v is None for v in last.values()):
        st.warning("A run finished without a test evaluation; start over to run it again.")
        return
    result = OUTCOMES[exp.key](last)  # type: ignore[arg-type]
    st.markdown("#### What your runs measured")
    st.table(result.rows)
    if predicted is not None and result.supported is not None:
        agreed = exp.choices.index(predicted) == result.supported
        (st.success if agreed else st.info)(f"You predicted: {md_text(predicted)}. " + (
            "Your runs agree." if agreed else f"Your runs support instead: {md_text(exp.choices[result.supported])}."))
    elif predicted is not None:
        st.info(f"You predicted: {md_text(predicted)}. Your runs do not clearly support any of the choices.")
    st.markdown("#### Why")
    st.markdown(" ".join(md_text(s) for s in result.sentences))
    st.markdown("#### The runs themselves")
    curves(lab, exp, arms)
    cols = st.columns(len(arms))
    for col, (label, name) in zip(cols, arms.items()):
        art = lab.open(name).artifacts()
        with col:
            if "reconstructions" in art:
                st.image(reconstructions_mosaic(art), output_format="PNG",
                         caption=f"{label}: test images (odd rows) and their reconstructions (even rows)")
            st.button("Show in the Training tab", key=K + exp.key + "_show_" + _slug(label), on_click=lab.show,
                      args=(session_id(), name), help="Make this the run the page shows (sidebar and Training tab)")


def curves(lab: Lab, exp: Experiment, arms: dict[str, str | None]) -> None:
    """Test ELBO and rate per epoch of every arm, from their metrics (a fork continues its parent's epochs)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("test ELBO (nats)", "rate KL(q‖p) (nats)"))
    colors = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
    for i, (label, name) in enumerate(arms.items()):
        rows = [r for r in lab.open(name).metrics() if r.get("split") == "test"]
        x = np.array([r["epoch"] for r in rows])
        for col, field_name in ((1, "elbo"), (2, "kl")):
            fig.add_trace(go.Scatter(x=x, y=[r[field_name] for r in rows], mode="lines+markers", name=label,
                                     legendgroup=label, showlegend=col == 1,
                                     line={"color": colors[i % len(colors)]}), row=1, col=col)
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.12, "x": 0})
    st.plotly_chart(fig, key=K + exp.key + "_curves", config={"displaylogo": False})
