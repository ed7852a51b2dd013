"""What a person does with one saved run: open, resume, fork, export, rename, delete.

Drawn by the Runs tab (dashboard/panels/runs.py) for the run the person ticked. Every action is
a widget callback that goes through the server's one Lab (vae_core.lab) by run name, and leaves a
one-line message, or its error in words, for the top of the tab. Anyone may open (read-only),
fork, export, rename or delete a run that is not training; only a session that may steer it (its
owner, or anyone for a run with no owner, such as the CLI's) resumes it. Names a person types go
through sanitize_name, so nothing outside the runs directory is touched. Exports are made on
click, not on every rerun.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import streamlit as st

from dashboard import settings
from dashboard.common import md_code, md_text, reconstructions_mosaic, samples_mosaic
from dashboard.state import can_steer, session_id
from vae_core.images import png_bytes
from vae_core.lab import (CHECKPOINT, LIMITS, UI_LIMITS, ConfigError, Lab, LocalRun, RunHandle, RunSummary,
                          UserError, sanitize_name)

K = "runs_"  # every widget key of the Runs tab starts with this
STATUS = {"running": "▶ running", "paused": "‖ paused", "queued": "⏳ queued", "finished": "✔ finished",
          "stopped": "■ stopped", "interrupted": "⚠ interrupted", "failed": "✖ failed",
          "corrupt": "✖ unreadable", "idle": "idle", "unknown": "? unknown"}
RESUMABLE = ("stopped", "interrupted", "failed", "finished", "unknown", "idle")
FORK_FIELDS = ("beta", "lr", "warmup_epochs", "free_bits", "epochs")


def parent_text(parent: Any) -> str:
    if isinstance(parent, dict) and parent.get("run"):
        return f"{parent['run']} @ step {parent.get('step', '?')}"
    return ""


def owner_text(owner: str | None, me: str) -> str:
    """Who steers a run, for the table: you, another session (short id), or anyone (a CLI run)."""
    if owner is None:
        return "anyone (CLI)"
    return "you" if owner == me else f"session {owner[:6]}"


# ------------------------------------------------------------------ exports (called on click, outside the script)

def metrics_csv_bytes(lab: Lab, name: str) -> bytes:
    return lab.metrics_csv(lab.open(name).metrics()).encode()


def samples_png(lab: Lab, name: str) -> bytes:
    return png_bytes(samples_mosaic(lab.open(name).artifacts(), scale=4))


def reconstructions_png(lab: Lab, name: str) -> bytes:
    return png_bytes(reconstructions_mosaic(lab.open(name).artifacts(), scale=4))


def checkpoint_bytes(lab: Lab, name: str) -> bytes:
    return (lab.path(name) / CHECKPOINT).read_bytes()


def zip_bytes(lab: Lab, name: str) -> bytes:
    return lab.export(name)


# ------------------------------------------------------------------ actions (widget callbacks)

def notice(kind: str, text: str) -> None:
    """A message ('success' or 'error') for the top of the Runs tab on the rerun that follows."""
    st.session_state["_runs_notice"] = (kind, text)


def select(names: list[str]) -> None:
    """Tick these runs (from a callback, before the table is drawn)."""
    st.session_state["_runs_selected"] = names
    st.session_state["_runs_names"] = None


def _show(lab: Lab, run: RunHandle) -> None:
    """Make `run` the one this session's Training, Explore and Evidence tabs show."""
    lab.show(session_id(), run.name)  # the sidebar follows the shown run by itself (controls.reconcile)


def _attempt(action: Callable[[], str]) -> None:
    """Run an action; its message, or its error in words, is shown at the top of the tab on the rerun."""
    try:
        notice("success", action())
    except UserError as e:
        notice("error", md_text(e))
    except Exception as e:  # anything else: a message, not a traceback
        notice("error", f"{type(e).__name__}: {md_text(e)}")


def _on_open(lab: Lab, name: str) -> None:
    def act() -> str:
        run = lab.open(name)
        _show(lab, run)
        if run.status().followed and run.status().active:
            return (f"Opened **{md_text(name)}**, which another process is training: the Training, Explore and Evidence "
                    "tabs follow it live, from its latest checkpoint.")
        return (f"Opened **{md_text(name)}**: the Training, Explore and Evidence tabs now show it, "
                "from its checkpoint (nothing is retrained).")
    _attempt(act)


def _on_resume(lab: Lab, name: str, finished: bool) -> None:
    def act() -> str:
        more = int(st.session_state.get(K + "more_epochs", 1)) if finished else None
        run = lab.resume(name, owner=session_id(), epochs=more)
        _show(lab, run)
        return (f"Training **{md_text(run.name)}** again from step {run.status().step:,}"
                + (f" for {more} more epochs" if more else "") + "; the Training tab shows it live.")
    _attempt(act)


def _on_fork(lab: Lab, name: str) -> None:
    def act() -> str:
        values = {f: st.session_state[K + "fork_" + f] for f in FORK_FIELDS}
        epochs = int(values.pop("epochs"))
        child = lab.fork(name, owner=session_id(), epochs=epochs, **{k: float(v) for k, v in values.items()})
        if child.status().state == "failed":
            raise ConfigError(f"the fork failed: {child.status().message}")
        _show(lab, child)
        select([child.name, name])  # tick child and parent, so the comparison below follows the fork live
        return (f"Forked **{md_text(name)}** into **{md_text(child.name)}** with β={values['beta']:g}, lr={values['lr']:g}: it "
                "continues from the parent's checkpoint and records it as its parent. Both are ticked below; the "
                "Training tab shows the new run live.")
    _attempt(act)


def _on_rename(lab: Lab, name: str) -> None:
    def act() -> str:
        shown = lab.current_name(session_id()) == name
        new = lab.rename(name, sanitize_name(st.session_state.get(K + "rename_to", "")))
        if shown:  # the page showed it: show it again under its new name
            lab.show(session_id(), new)
        select([new if n == name else n for n in st.session_state.get("_runs_selected", [])])
        st.session_state[K + "rename_to"] = ""
        return f"Renamed **{md_text(name)}** to **{md_text(new)}**."
    _attempt(act)


def _on_delete(pending: str | None) -> None:
    st.session_state["_runs_delete"] = pending


def _on_delete_confirmed(lab: Lab, name: str) -> None:
    st.session_state["_runs_delete"] = None

    def act() -> str:
        lab.delete(name)  # refuses a run that trains, here or in another live process, before anything goes
        return f"Deleted **{md_text(name)}**."
    _attempt(act)


def _handle(lab: Lab, s: RunSummary) -> RunHandle | None:
    if s.error is not None:
        return None
    try:
        return lab.open(s.name)
    except UserError:
        return None


def render(lab: Lab, s: RunSummary) -> None:
    """The actions for run `s`: its status line, Open / Resume, then Fork, Export, Rename or delete."""
    st.subheader(md_text(s.name))
    run = _handle(lab, s)
    training_here = isinstance(run, LocalRun) and (run.is_alive() or lab.queue_position(s.name) is not None)
    steer = run is not None and can_steer(lab, run)
    bits = [STATUS.get(s.status, s.status), s.message]
    if s.parent:
        bits.append(f"forked from {parent_text(s.parent)}")
    if s.host:
        bits.append(f"on {s.host}")
    st.caption(" · ".join(md_text(b) for b in bits if b))
    if s.error:
        st.error(f"This run cannot be opened: {md_text(s.error)}. You can still rename or delete it.")
    usable = run is not None
    finished = s.status == "finished"
    resumable = usable and steer and s.status in RESUMABLE and not training_here

    c1, c2, c3, c4 = st.columns([1, 1.3, 1.2, 2.5], vertical_alignment="bottom")
    c1.button("Open", key=K + "open", type="primary", disabled=not usable, on_click=_on_open,
              args=(lab, s.name), width="stretch",
              help="Show this run in the Training, Explore and Evidence tabs, from its checkpoint (read-only "
                   "unless it is yours); a run another process trains is followed live")
    if finished and steer:
        c3.number_input("More epochs", key=K + "more_epochs", min_value=1, max_value=int(LIMITS["epochs"][1]),
                        value=run.config.train.epochs)
    c2.button("Train more" if finished else "Resume", key=K + "resume", disabled=not resumable,
              on_click=_on_resume, args=(lab, s.name, finished), width="stretch",
              help="Continue from the last checkpoint: same run, same step count, metrics appended")
    if training_here:
        c4.caption("Training now in this server: pause or stop it in the sidebar." if steer else
                   "Training now in this server for another session: open it to watch, or fork it.")
    elif s.status in ("running", "paused", "queued"):
        c4.caption("Being trained by another process: **Open** follows it live; resume, rename and delete wait "
                   "until it ends.")
    elif usable and not steer:
        c4.caption("Started by another session: open it read-only, compare or fork it; only its owner resumes it.")
    elif s.status == "interrupted":
        c4.caption("The process training it ended; **Resume** continues from its last checkpoint.")

    if usable:
        _fork(lab, run)
        _exports(lab, s)
    _rename_delete(lab, s)


def _fork(lab: Lab, run: RunHandle) -> None:
    with st.expander("Fork with new settings"):
        st.caption("A new run that starts from this run's last checkpoint (weights and optimiser state) with its "
                   "own β, learning rate, KL warm-up or free bits. It records this run and the step it forked at, "
                   "and continues the step count, so its curves line up with the parent's.")
        # Start from the run's settings when another run is picked, or when the form's state was dropped
        # (Streamlit forgets a widget's value while its tab is closed).
        if st.session_state.get("_runs_fork_for") != run.name or any(K + "fork_" + f not in st.session_state
                                                                     for f in FORK_FIELDS):
            cfg = run.config.train
            for f in FORK_FIELDS:
                st.session_state[K + "fork_" + f] = getattr(cfg, f)
            st.session_state["_runs_fork_for"] = run.name
        with st.form(K + "fork_form", border=False):
            c1, c2 = st.columns(2)
            c1.select_slider(settings.LABELS["beta"], settings.with_value(settings.BETAS,
                             st.session_state[K + "fork_beta"]), key=K + "fork_beta")
            c2.select_slider(settings.LABELS["lr"], settings.with_value(settings.LRS, st.session_state[K + "fork_lr"]),
                             key=K + "fork_lr", format_func=lambda v: f"{v:g}")
            c3, c4, c5 = st.columns(3)
            c3.number_input(settings.LABELS["warmup_epochs"], key=K + "fork_warmup_epochs", min_value=0.0,
                            max_value=float(LIMITS["warmup_epochs"][1]), step=1.0)
            c4.number_input(settings.LABELS["free_bits"], key=K + "fork_free_bits", min_value=0.0,
                            max_value=float(LIMITS["free_bits"][1]), step=0.05)
            c5.number_input("Epochs to train", key=K + "fork_epochs", min_value=1,
                            max_value=int(LIMITS["epochs"][1]))
            st.form_submit_button("Fork and train", key=K + "fork_submit", on_click=_on_fork, args=(lab, run.name))
        if UI_LIMITS["beta"][1] < st.session_state[K + "fork_beta"]:
            st.caption("β above the sidebar's range, kept from the run.")


def _exports(lab: Lab, s: RunSummary) -> None:
    with st.expander("Export"):
        st.caption("The zip holds the whole run (config.json with seed and library versions, metrics, checkpoint); "
                   f"on another machine {md_code(f'python -m vae_core train --resume {s.name}.zip')} continues it.")
        cols = st.columns(5)
        files = [("Metrics (CSV)", metrics_csv_bytes, "-metrics.csv", "text/csv", "csv"),
                 ("Samples (PNG)", samples_png, "-samples.png", "image/png", "samples"),
                 ("Reconstructions (PNG)", reconstructions_png, "-reconstructions.png", "image/png", "recon"),
                 ("Checkpoint (.pt)", checkpoint_bytes, "-checkpoint.pt", "application/octet-stream", "ckpt"),
                 ("Whole run (.zip)", zip_bytes, ".zip", "application/zip", "zip")]
        for col, (label, make, suffix, mime, key) in zip(cols, files):
            # Deferred: the bytes are made when the button is clicked, not on every rerun.
            col.download_button(label, functools.partial(make, lab, s.name), file_name=s.name + suffix, mime=mime,
                                key=K + "dl_" + key, on_click="ignore", width="stretch")


def _rename_delete(lab: Lab, s: RunSummary) -> None:
    pending = st.session_state.get("_runs_delete") == s.name
    with st.expander("Rename or delete", expanded=pending):
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        typed = c1.text_input("New name", key=K + "rename_to", placeholder=s.name,
                              help="Letters, digits, '.', '_', '-', '=' and '+'; anything else becomes '-'")
        c2.button("Rename", key=K + "rename", disabled=not typed, on_click=_on_rename,
                  args=(lab, s.name), width="stretch")
        if typed:
            try:
                st.caption(f"Will be saved as `{sanitize_name(typed)}`.")
            except ConfigError as e:
                st.caption(f"⚠ {md_text(e)}")
        if not pending:
            st.button("Delete…", key=K + "delete", on_click=_on_delete, args=(s.name,),
                      help="Asks for confirmation first")
            return
        st.warning(f"Delete **{md_text(s.name)}**? Its checkpoint, metrics and config are removed from disk; "
                   "this cannot be undone.")
        c1, c2, _ = st.columns([1, 1, 3])
        c1.button("Yes, delete", key=K + "delete_confirm", type="primary", on_click=_on_delete_confirmed,
                  args=(lab, s.name), width="stretch")
        c2.button("Cancel", key=K + "delete_cancel", on_click=_on_delete, args=(None,), width="stretch")
