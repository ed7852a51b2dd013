"""Sidebar controls: run buttons and every setting of a run, validated through the core's config.

Widget values live in `st.session_state` under `cfg_<field>` keys (UI choices only). The
configuration is always built by `settings.config_from_values`, so the UI, the CLI and
saved runs share one set of rules; a bad combination shows its message under the control
and disables Train instead of raising.

The buttons act on this session's current run through the Lab: Train starts a new run (it
trains at once or waits in the queue) and never stops another; Pause, Step, Stop and the ⚡
settings steer the shown run only when this session owns it (a run another session started
is shown read-only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import streamlit as st

from dashboard.common import md_text
from dashboard.settings import (ARCH_NAMES, BATCH_SIZES, BETAS, DEFAULTS, LABELS, LIKELIHOOD_NAMES, LRS,
                                PRECISION_NAMES, PREFIX, changed_fields, config_from_values, field_errors, query_from_values,
                                values_from_config, values_from_query, with_value)
from dashboard import dataset_picker
from dashboard.state import can_steer, current_run, session_id
from vae_core.lab import (ARCHS, DEVICES, LIKELIHOODS, LIMITS, LIVE_FIELDS, PRECISIONS, UI_LIMITS, Lab,
                          RunConfig, RunHandle, Status, UserError)

PROCESSES_KEY = "train_processes"  # a launch choice, not a setting of the run: not in the URL or the config
STEERABLE = ("running", "paused")  # states whose ⚡ settings change the run live
RESUMABLE = ("paused", "stopped", "failed", "interrupted")
READ_ONLY = ("🔒 Read-only: this run belongs to another session, so its buttons and ⚡ settings are off here. "
             "Open it from the **Runs** tab to look at it; fork it there to train your own copy with changes.")


@dataclass
class Controls:
    """What the sidebar produced this run: the values, the config (None if invalid) and errors by field."""

    values: dict[str, Any]
    config: RunConfig | None
    errors: dict[str, str]


# ------------------------------------------------------------------ session state

def current_values() -> dict[str, Any]:
    return {k: st.session_state.get(PREFIX + k, d) for k, d in DEFAULTS.items()}


def init_state(run: RunHandle | None) -> None:
    """Seed the controls once per session: from the URL, else the run being shown, else defaults.

    A shared URL carries its settings (see sync_url). Without any, a reload or second tab
    opened while a run trains shows that run's settings, rather than defaults that would
    start a different run on the next Train.
    """
    if st.session_state.get("_cfg_seeded"):
        _reassert()
        return
    params = {k: st.query_params[k] for k in st.query_params if k in DEFAULTS}
    if params:
        values, ignored = values_from_query(params)
        if ignored:
            _notice("warning", "Ignored invalid settings in the URL: " + ", ".join(md_text(i) for i in ignored))
    elif run is not None:
        values = {**DEFAULTS, **values_from_config(run.config)}
    else:
        values = dict(DEFAULTS)
    for k, v in values.items():
        st.session_state.setdefault(PREFIX + k, v)
    st.session_state["_cfg_seeded"] = True


def reconcile(run: RunHandle | None, status: Status | None) -> None:
    """Follow the shown run: the controls are the one writer of their keys, and they take their values from it.

    When another run is shown (Train, Open, Resume, Fork, from any tab) every control takes that run's
    settings; while it is shown, a live setting that changed in the run (a remedy on the Evidence tab,
    another process through control.json) moves its control. A person's own edits are left alone.
    """
    if run is None or status is None:
        st.session_state["_cfg_run"] = None
        return
    live = {"beta": status.beta, "lr": status.lr, "warmup_epochs": status.warmup_epochs,
            "free_bits": status.free_bits}
    if st.session_state.get("_cfg_run") != run.token:
        values = {**values_from_config(run.config), **live}
        lo, hi = UI_LIMITS["latent_dim"]
        if not lo <= values["latent_dim"] <= hi:  # a CLI run beyond the slider's range: leave the slider be
            del values["latent_dim"]
        changed = values
    else:
        seen = st.session_state.get("_cfg_live", {})
        changed = {k: v for k, v in live.items() if seen.get(k) != v}
    for name, value in changed.items():
        # Only a value the control does not show yet is sent: every assignment sends it to the browser, and
        # the echo of a β this session just applied landed after the person's next arrow presses, undoing them.
        if name in DEFAULTS and st.session_state.get(PREFIX + name) != value:
            st.session_state[PREFIX + name] = value
    st.session_state["_cfg_run"], st.session_state["_cfg_live"] = run.token, live


def _reassert() -> None:
    """Hand every control its value again, so each run tells the browser what it must show.

    Streamlit sends a keyed widget's value to the browser only in the run where session state
    set it; afterwards the browser keeps its own copy. A widget whose code arrives late (each
    widget type is a separate script the page loads on demand: on a busy machine the checkbox
    and number boxes in Advanced arrived after the first rerun) has no copy and starts from
    its widget default, which the next rerun sends back: the seeded value is silently lost.
    Assigning the current value before the widget is drawn makes every run send it.

    Except the control the person just moved (it has the value: the browser sent it). Sent back, it
    arrived after the person's next quick presses and moved the slider back under them: 14 arrow
    presses on β 0.08-0.3 s apart while a run trained ended 2-7 values short of where they led.
    """
    moved = st.session_state.pop("_cfg_moved", None)
    for k, d in DEFAULTS.items():
        if k != moved:
            st.session_state[PREFIX + k] = st.session_state.get(PREFIX + k, d)


def sync_url(values: dict[str, Any]) -> None:
    """Mirror the settings that differ from the defaults into the URL, so a copied URL reopens them."""
    want = query_from_values(values)
    for name in DEFAULTS:
        if name in want:
            if st.query_params.get(name) != want[name]:
                st.query_params[name] = want[name]
        elif name in st.query_params:
            del st.query_params[name]


def dataset_availability() -> dict[str, tuple[bool, str]]:
    """Which datasets this machine offers: local files at once, the network probe once the warm-up has run it."""
    return Lab.dataset_availability(wait=False)


def device_info() -> tuple[dict[str, bool], str]:
    """The devices this machine has and the one 'auto' picks; until the warm-up has loaded torch, the CPU
    (the first page draws without waiting for torch: seconds on a busy machine)."""
    have = Lab.devices_if_known()
    if have is None:
        return {"cpu": True}, "cpu, while GPUs are looked for"
    return have, "cuda" if have.get("cuda") else "mps" if have.get("mps") else "cpu"


# ------------------------------------------------------------------ callbacks (run before the script)

def _notice(kind: str, text: str) -> None:
    """Show a message under the buttons until the person's next action (see _expire_notice)."""
    st.session_state["_ctl_notice"] = (kind, text)
    st.session_state["_ctl_notice_new"] = True


def _expire_notice() -> None:
    """Drop the last message once a run follows an action of the person's that set none.

    A message set by a callback shows in the run right after it, and also in reruns the app
    starts itself: the live panel reruns the page when the first metrics arrive, which on a
    loaded machine can interrupt the very run that showed "β = 4 applied" (a CI failure).
    """
    app_started = st.session_state.pop("_app_rerun", False)
    new = st.session_state.pop("_ctl_notice_new", False)
    if not (app_started or new):
        st.session_state.pop("_ctl_notice", None)


def _build_or_report() -> RunConfig | None:
    values = current_values()
    errors = field_errors(values, dataset_availability())
    if errors:
        _notice("error", "Fix the settings marked in red first.")
        return None
    return config_from_values(values)


def _on_train(lab: Lab) -> None:
    """A new run of this session's. No other session's run is touched; this session's own shown run keeps
    training when a slot is free for the new one, and is stopped (checkpointed) when the new one would
    otherwise wait behind it: a person who changes a setting and presses Train wants that run now."""
    config = _build_or_report()
    if config is None:
        return
    sid = session_id()
    before = current_run(lab)
    stopped = None
    try:
        if before is not None and lab.owner(before.run_dir) == sid:
            state = before.status().state
            if state == "queued" or (state in STEERABLE and lab.training_count() >= lab.max_runs):
                lab.stop(before.name, owner=sid, wait=5.0)
                stopped = before.name
        processes = int(st.session_state.get(PROCESSES_KEY) or 1)
        if processes > 1:  # one run on N processes (torchrun + DDP), followed through its directory
            run = lab.start_distributed(config, processes=processes, owner=sid)
            _notice("info", f"Training on {processes} processes (torchrun, DistributedDataParallel). This page follows "
                            "the run through its files; Pause, Stop and ⚡ changes reach all processes at their next "
                            "log point.")
        else:
            run = lab.start(config, owner=sid)
    except UserError as e:
        _notice("error", f"Could not start the run: {md_text(e)}")
        return
    lab.show(sid, run.name)
    if stopped:
        _notice("info", f"Your previous run {md_text(stopped)} was stopped and checkpointed to make room (this server "
                        f"trains {lab.max_runs} at once); Resume it from the Runs tab.")


def _steerable(lab: Lab) -> RunHandle | None:
    """This session's current run if it may steer it; else None (and a message when there is a run)."""
    run = current_run(lab)
    if run is not None and not can_steer(lab, run):
        _notice("warning", f"Run {md_text(run.name)} belongs to another session; it is read-only here.")
        return None
    return run


def _on_pause_resume(lab: Lab) -> None:
    run = _steerable(lab)
    if run is None:
        return
    try:
        if run.status().state == "running":
            lab.pause(run.name, owner=session_id())
        else:
            lab.resume(run.name, owner=session_id(), live={k: current_values()[k] for k in LIVE_FIELDS})
    except UserError as e:
        _notice("error", f"Could not {'pause' if run.status().state == 'running' else 'resume'}: {md_text(e)}")


def _on_step(lab: Lab) -> None:
    """One optimisation step of the current run (pausing it), or a new run started paused after one step."""
    sid = session_id()
    if current_run(lab) is None:
        config = _build_or_report()
        if config is None:
            return
        try:
            lab.show(sid, lab.start(config, owner=sid, step_only=True).name)
        except UserError as e:
            _notice("error", f"Could not step: {md_text(e)}")
        return
    run = _steerable(lab)
    if run is None:
        return
    try:
        lab.step(run.name, owner=sid)
    except UserError as e:
        _notice("error", f"Could not step: {md_text(e)}")


def _on_stop(lab: Lab) -> None:
    run = _steerable(lab)
    if run is None:
        return
    try:
        lab.stop(run.name, owner=session_id())
    except UserError as e:
        _notice("error", f"Could not stop: {md_text(e)}")


def _on_reset(lab: Lab) -> None:
    """Show no run. This session's own active (or queued) run is stopped first; anyone else's is left alone."""
    sid = session_id()
    run = current_run(lab)
    if run is not None:
        s = run.status()
        if s.owner == sid and s.state in ("running", "paused", "queued"):
            try:
                lab.stop(run.name, owner=sid)
            except UserError as e:
                _notice("error", f"Could not stop: {md_text(e)}")
                return
    lab.show(sid, None)


def _on_live_change(lab: Lab, name: str) -> None:
    """β, lr, warm-up and free bits go straight to an active run this session steers."""
    st.session_state["_cfg_moved"] = name  # the browser has this value: do not send it back (_reassert)
    run = current_run(lab)
    if run is None or run.status().state not in STEERABLE:
        return
    value = st.session_state[PREFIX + name]
    if not can_steer(lab, run):
        _notice("info", f"{LABELS[name]} = {value:g} was not applied: run {md_text(run.name)} belongs to another session "
                        "and is read-only here. Press **Train** to start your own run with it.")
        return
    try:
        lab.update(run.name, owner=session_id(), **{name: value})
    except UserError as e:
        _notice("error", md_text(e))
        return
    _notice("success", f"{LABELS[name]} = {value:g} applied to the running run from its next step.")


# ------------------------------------------------------------------ drawing

def render(lab: Lab) -> Controls:
    """Draw the sidebar controls (call inside `with st.sidebar:`) and return what they describe."""
    run = current_run(lab)
    _expire_notice()
    init_state(run)
    status = run.status() if run is not None else None
    reconcile(run, status)
    availability = dataset_availability()
    slots: dict[str, Any] = {}

    # Buttons first: they are what a person reaches for while watching a run. Their effects run as
    # callbacks before the script, so the whole page (labels included) shows the new state at once.
    buttons = st.container()

    st.subheader("Data")
    dataset_picker.render(availability)  # built-in, colour sets, a folder or zip of your own; described
    slots["dataset"] = st.empty()

    st.subheader("Model")
    st.selectbox(LABELS["arch"], ARCHS, key=PREFIX + "arch", format_func=ARCH_NAMES.get)
    slots["arch"] = st.empty()
    lo, hi = UI_LIMITS["latent_dim"]
    st.slider(LABELS["latent_dim"], int(lo), int(hi), key=PREFIX + "latent_dim",
              help="Dimensions of z. With 2 the latent space can be drawn directly (manifold, scatter).")
    slots["latent_dim"] = st.empty()
    st.selectbox(LABELS["likelihood"], LIKELIHOODS, key=PREFIX + "likelihood", format_func=LIKELIHOOD_NAMES.get)
    slots["likelihood"] = st.empty()

    st.subheader("Objective")
    st.select_slider("⚡ " + LABELS["beta"], with_value(BETAS, st.session_state.get(PREFIX + "beta")),
                     key=PREFIX + "beta", format_func=lambda b: f"{b:g}", on_change=_on_live_change,
                     args=(lab, "beta"),
                     help="Loss = −E[log p(x|z)] + β·KL. β = 1 is the ELBO; β > 1 trades reconstruction "
                          "for a simpler code (β-VAE), β < 1 the reverse.")
    slots["beta"] = st.empty()
    st.number_input("⚡ " + LABELS["warmup_epochs"], min_value=0.0, max_value=float(LIMITS["warmup_epochs"][1]),
                    step=0.5, key=PREFIX + "warmup_epochs", on_change=_on_live_change, args=(lab, "warmup_epochs"),
                    help="β ramps linearly from 0 to its value over this many epochs (0 = off).")
    slots["warmup_epochs"] = st.empty()
    st.number_input("⚡ " + LABELS["free_bits"], min_value=0.0, max_value=float(LIMITS["free_bits"][1]), step=0.05,
                    key=PREFIX + "free_bits", on_change=_on_live_change, args=(lab, "free_bits"),
                    help="Each latent dimension's KL counts as at least this much in the loss "
                         "(Kingma et al. 2016), which keeps dimensions from collapsing early. 0 = off.")
    slots["free_bits"] = st.empty()

    st.subheader("Optimisation")
    st.select_slider("⚡ " + LABELS["lr"], with_value(LRS, st.session_state.get(PREFIX + "lr")), key=PREFIX + "lr",
                     format_func=lambda v: f"{v:g}", on_change=_on_live_change, args=(lab, "lr"))
    slots["lr"] = st.empty()
    st.select_slider(LABELS["batch_size"], with_value(BATCH_SIZES, st.session_state.get(PREFIX + "batch_size")),
                     key=PREFIX + "batch_size")
    slots["batch_size"] = st.empty()
    st.number_input(LABELS["epochs"], min_value=1, max_value=int(LIMITS["epochs"][1]), step=1, key=PREFIX + "epochs")
    slots["epochs"] = st.empty()
    have, auto = device_info()
    st.selectbox(LABELS["device"], DEVICES, key=PREFIX + "device", format_func=lambda d: _device_label(d, have, auto),
                 help="Available here: " + ", ".join(d for d, ok in have.items() if ok))
    slots["device"] = st.empty()
    st.number_input(LABELS["seed"], min_value=0, max_value=int(LIMITS["seed"][1]), step=1, key=PREFIX + "seed")
    slots["seed"] = st.empty()

    with st.expander("Advanced"):
        st.number_input(LABELS["hidden_dim"], min_value=int(LIMITS["hidden_dim"][0]),
                        max_value=int(LIMITS["hidden_dim"][1]), step=16, key=PREFIX + "hidden_dim")
        slots["hidden_dim"] = st.empty()
        st.checkbox(LABELS["binarize"], key=PREFIX + "binarize",
                    help="Bernoulli likelihood only. Binarized data make the reported numbers true log-likelihoods "
                         "(in nats); grey-level targets give a cross-entropy that is not one.")
        slots["binarize"] = st.empty()
        st.number_input(LABELS["gaussian_sigma"], min_value=float(LIMITS["gaussian_sigma"][0]),
                        max_value=float(LIMITS["gaussian_sigma"][1]), step=0.01, format="%.3f",
                        key=PREFIX + "gaussian_sigma", help="Observation noise for the Gaussian likelihoods "
                                                            "(the starting value when learned).")
        slots["gaussian_sigma"] = st.empty()
        st.number_input(LABELS["train_size"], min_value=0, max_value=int(LIMITS["train_size"][1]), step=512,
                        key=PREFIX + "train_size", help="Train on the first N images only: quick experiments.")
        slots["train_size"] = st.empty()
        st.number_input(LABELS["evidence_every"], min_value=0, max_value=int(LIMITS["evidence_every"][1]), step=1,
                        key=PREFIX + "evidence_every",
                        help="Importance-weighted estimates of log p(x) for the Evidence tab; 0 = never.")
        slots["evidence_every"] = st.empty()
        st.selectbox(LABELS["precision"], PRECISIONS, key=PREFIX + "precision", format_func=PRECISION_NAMES.get,
                     help="bfloat16: the encoder and decoder compute in bfloat16 while training (weights, optimiser, "
                          "loss and every evaluation stay float32). Faster on CUDA GPUs and on CPUs with AMX; "
                          "slower on other CPUs. Reported numbers are float32 evaluations either way.")
        slots["precision"] = st.empty()
        _processes_input()

    values = current_values()
    sync_url(values)
    errors = field_errors(values, availability)
    for name, message in errors.items():
        slots.get(name, buttons).error(message)  # '' (no single control) goes beside the buttons
    config = None if errors else config_from_values(values)

    with buttons:
        _buttons(lab, status, can_steer(lab, run), errors)
        if status is not None and status.active and config is not None:
            changed = changed_fields(config, run.config)
            if changed:
                st.info("Changed since this run started: " + ", ".join(LABELS[k] for k in changed)
                        + ". Press **Train** to start a new run with them.")
    return Controls(values, config, errors)


def _buttons(lab: Lab, status: Status | None, steer: bool, errors: dict[str, str]) -> None:
    state = status.state if status is not None else None
    mine = status is None or steer  # the steering buttons act only on a run this session may steer
    st.button("Train", key="btn_train", type="primary", width="stretch", on_click=_on_train, args=(lab,),
              disabled=bool(errors),
              help="Start a new run with these settings. Other sessions' runs keep training; yours keeps training "
                   "too if the server has a free slot, else it is stopped and saved to make room. When the slots "
                   "are full of other sessions' runs, the new one waits in a queue and starts by itself.")
    c1, c2 = st.columns(2)
    c1.button("Resume" if state in RESUMABLE else "Pause", key="btn_pause", width="stretch",
              on_click=_on_pause_resume, args=(lab,),
              disabled=not mine or not (state == "running" or state in RESUMABLE),
              help="Pause the run, or continue it (a stopped or failed run continues where it left off, "
                   "with the ⚡ settings shown here)")
    c2.button("Step", key="btn_step", width="stretch", on_click=_on_step, args=(lab,),
              disabled=not mine or state in ("finished", "queued") or (state is None and bool(errors)),
              help="Do one optimisation step and pause (starts a new run paused if none is shown)")
    c3, c4 = st.columns(2)
    c3.button("Stop", key="btn_stop", width="stretch", on_click=_on_stop, args=(lab,),
              disabled=not mine or state not in ("running", "paused", "queued"),
              help="End the run (a queued one leaves the queue); it is checkpointed and can be resumed")
    c4.button("Reset", key="btn_reset", width="stretch", on_click=_on_reset, args=(lab,), disabled=status is None,
              help="Clear the page. Your own active run is stopped and saved first; anyone else's keeps training.")
    if not mine:
        st.caption(READ_ONLY)
    notice = st.session_state.get("_ctl_notice")
    st.session_state.pop("_ctl_notice_new", None)  # shown: the person's next action clears it
    if notice is not None:
        getattr(st, notice[0])(notice[1])
    st.caption("⚡ settings (β, learning rate, KL warm-up, free bits) change a running run live; "
               "the others take effect when you press Train.")


def _processes_input() -> None:
    """'Train on N processes' where this machine has several GPUs or CPU cores (1, the default: this server's process)."""
    most = Lab.max_processes()
    if most < 2:
        return
    st.session_state.setdefault(PROCESSES_KEY, 1)
    if st.session_state[PROCESSES_KEY] > most:
        st.session_state[PROCESSES_KEY] = most
    have, _ = device_info()
    st.number_input("Train on N processes (torchrun)", min_value=1, max_value=most, step=1, key=PROCESSES_KEY,
                    help="1: train in this server. 2 or more: one run on that many processes with PyTorch's "
                         "DistributedDataParallel, " + ("one per GPU" if have.get("cuda") else "sharing the CPU cores")
                         + "; each takes its share of every batch. It trains outside this server (started with "
                           "torchrun) and the page follows it like any run.")


def _device_label(name: str, have: dict[str, bool], auto: str) -> str:
    if name == "auto":
        return f"auto (→ {auto})"
    return name + ("" if have.get(name) else " (not available)")
