"""What a person does with one saved run: open, resume, fork, export, rename, delete.

Drawn by the Runs tab (dashboard/panels/runs.py) for the run the person ticked. Every action is
a widget callback that goes through the process-wide registry (trainers) or vae_core.runs
(files), and leaves a one-line message, or its error in words, for the top of the tab. Names a
person types go through runs.sanitize_name/resolve_run, so nothing outside the runs directory is
touched. Exports are made on click, not on every rerun.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from dashboard import settings
from dashboard.panels import compare
from dashboard.state import Registry
from vae_core import runs, transfer
from vae_core.config import LIMITS, UI_LIMITS, ConfigError
from vae_core.images import png_bytes
from vae_core.trainer import Trainer

K = "runs_"  # every widget key of the Runs tab starts with this
STATUS = {"running": "▶ running", "paused": "‖ paused", "finished": "✔ finished", "stopped": "■ stopped",
          "interrupted": "⚠ interrupted", "failed": "✖ failed", "corrupt": "✖ unreadable", "idle": "idle",
          "unknown": "? unknown"}
RESUMABLE = ("stopped", "interrupted", "failed", "finished", "unknown", "idle")
FORK_FIELDS = ("beta", "lr", "warmup_epochs", "free_bits", "epochs")


def parent_text(parent: Any) -> str:
    if isinstance(parent, dict) and parent.get("run"):
        return f"{parent['run']} @ step {parent.get('step', '?')}"
    return ""


# ------------------------------------------------------------------ exports (called on click, outside the script)

def metrics_csv_bytes(run_dir: str | Path) -> bytes:
    return runs.metrics_csv(runs.read_metrics(Path(run_dir))).encode()


def samples_png(run_dir: str | Path) -> bytes:
    return png_bytes(compare.samples_mosaic(compare.run_images(run_dir), scale=4))


def reconstructions_png(run_dir: str | Path) -> bytes:
    return png_bytes(compare.reconstructions_mosaic(compare.run_images(run_dir), scale=4))


def checkpoint_bytes(run_dir: str | Path) -> bytes:
    return (Path(run_dir) / runs.CHECKPOINT).read_bytes()


def zip_bytes(run_dir: str | Path) -> bytes:
    return transfer.export_zip(Path(run_dir))


# ------------------------------------------------------------------ actions (widget callbacks)

def notice(kind: str, text: str) -> None:
    """A message ('success' or 'error') for the top of the Runs tab on the rerun that follows."""
    st.session_state["_runs_notice"] = (kind, text)


def select(names: list[str]) -> None:
    """Tick these runs (from a callback, before the table is drawn)."""
    st.session_state["_runs_selected"] = names
    st.session_state["_runs_names"] = None


def _mirror_controls(t: Trainer) -> None:
    """Put the shown run's settings into the sidebar, so its Resume and live sliders act with this run's values
    (live ones as last used, which can differ from config.json after a change during training)."""
    s = t.status()
    values = {**settings.values_from_config(t.config), "beta": s.beta, "lr": s.lr,
              "warmup_epochs": s.warmup_epochs, "free_bits": s.free_bits}
    lo, hi = UI_LIMITS["latent_dim"]
    if not lo <= values["latent_dim"] <= hi:  # a CLI run beyond the slider's range: leave the slider be
        del values["latent_dim"]
    for name, value in values.items():
        st.session_state[settings.PREFIX + name] = value


def _attempt(action: Callable[[], str]) -> None:
    """Run an action; its message, or its error in words, is shown at the top of the tab on the rerun."""
    try:
        notice("success", action())
    except (ConfigError, runs.RunFileError, OSError) as e:
        notice("error", str(e))
    except Exception as e:  # anything else: a message, not a traceback
        notice("error", f"{type(e).__name__}: {e}")


def _on_open(registry: Registry, path: str) -> None:
    def act() -> str:
        _mirror_controls(registry.open(path))
        return (f"Opened **{Path(path).name}**: the Training, Explore and Evidence tabs now show it, "
                "from its checkpoint (nothing is retrained).")
    _attempt(act)


def _on_resume(registry: Registry, path: str, finished: bool) -> None:
    def act() -> str:
        more = int(st.session_state.get(K + "more_epochs", 1)) if finished else None
        t = registry.resume_run(path, epochs=more)
        _mirror_controls(t)
        return (f"Training **{t.name}** again from step {t.status().step:,}"
                + (f" for {more} more epochs" if more else "") + "; the Training tab shows it live.")
    _attempt(act)


def _on_fork(registry: Registry, path: str) -> None:
    def act() -> str:
        values = {f: st.session_state[K + "fork_" + f] for f in FORK_FIELDS}
        epochs = int(values.pop("epochs"))
        t = registry.fork(path, epochs=epochs, **values)
        _mirror_controls(t)
        deadline = time.monotonic() + 3.0  # the thread names the new folder within ~0.1 s (data are cached)
        while t.run_dir is None and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if t.status().state == "failed":
            raise runs.RunFileError(f"the fork failed: {t.status().message}")
        if t.run_dir is not None:  # tick child and parent, so the comparison below follows the fork live
            select([t.run_dir.name, Path(path).name])
        return (f"Forked **{Path(path).name}** into **{t.name or 'a new run'}** with β={values['beta']:g}, "
                f"lr={values['lr']:g}: it continues from the parent's checkpoint and records it as its parent. "
                "Both are ticked below; the Training tab shows the new run live.")
    _attempt(act)


def _on_rename(registry: Registry, runs_dir: Path, name: str) -> None:
    def act() -> str:
        new = runs.sanitize_name(st.session_state.get(K + "rename_to", ""))
        src = runs.resolve_run(runs_dir, name)
        if registry.is_training(src):
            raise runs.RunFileError(f"run {name!r} is training; stop it (sidebar) before renaming it")
        shown = registry.forget(src)  # its trainer would keep writing to the old folder
        try:
            dst = runs.rename_run(runs_dir, name, new)
        except Exception:
            if shown:
                registry.open(src)
            raise
        if shown:  # the page showed it: show it again under its new name
            registry.open(dst)
        select([dst.name if n == name else n for n in st.session_state.get("_runs_selected", [])])
        st.session_state[K + "rename_to"] = ""
        return f"Renamed **{name}** to **{dst.name}**."
    _attempt(act)


def _on_delete(pending: str | None) -> None:
    st.session_state["_runs_delete"] = pending


def _on_delete_confirmed(registry: Registry, runs_dir: Path, name: str) -> None:
    st.session_state["_runs_delete"] = None

    def act() -> str:
        path = runs.resolve_run(runs_dir, name)
        if registry.is_training(path):
            raise runs.RunFileError(f"run {name!r} is training; stop it (sidebar) before deleting it")
        runs.delete_run(runs_dir, name)  # refuses a run another live process trains, before anything goes
        registry.forget(path)
        return f"Deleted **{name}**."
    _attempt(act)


def render(registry: Registry, runs_dir: Path, s: runs.RunSummary) -> None:
    """The actions for run `s`: its status line, Open / Resume, then Fork, Export, Rename or delete."""
    st.subheader(s.name)
    training_here = registry.is_training(s.path)
    bits = [STATUS.get(s.status, s.status), s.message]
    if s.parent:
        bits.append(f"forked from {parent_text(s.parent)}")
    st.caption(" · ".join(b for b in bits if b))
    if s.error:
        st.error(f"This run cannot be opened: {s.error}. You can still rename or delete it.")
    usable = s.error is None
    finished = s.status == "finished"
    resumable = usable and s.status in RESUMABLE and not training_here

    c1, c2, c3, c4 = st.columns([1, 1.3, 1.2, 2.5], vertical_alignment="bottom")
    c1.button("Open", key=K + "open", type="primary", disabled=not usable, on_click=_on_open,
              args=(registry, s.path), width="stretch",
              help="Show this run in the Training, Explore and Evidence tabs, from its checkpoint")
    if finished:
        c3.number_input("More epochs", key=K + "more_epochs", min_value=1, max_value=int(LIMITS["epochs"][1]),
                        value=runs.read_config(Path(s.path)).train.epochs)
    c2.button("Train more" if finished else "Resume", key=K + "resume", disabled=not resumable,
              on_click=_on_resume, args=(registry, s.path, finished), width="stretch",
              help="Continue from the last checkpoint: same run, same step count, metrics appended")
    if training_here:
        c4.caption("Training now in this server: pause or stop it in the sidebar.")
    elif s.status in ("running", "paused"):
        c4.caption("Being trained by another process; resume, rename and delete wait until it ends.")
    elif s.status == "interrupted":
        c4.caption("The process training it ended; **Resume** continues from its last checkpoint.")

    if usable:
        _fork(registry, s)
        _exports(s)
    _rename_delete(registry, runs_dir, s)


def _fork(registry: Registry, s: runs.RunSummary) -> None:
    with st.expander("Fork with new settings"):
        st.caption("A new run that starts from this run's last checkpoint (weights and optimiser state) with its "
                   "own β, learning rate, KL warm-up or free bits. It records this run and the step it forked at, "
                   "and continues the step count, so its curves line up with the parent's.")
        # Start from the run's settings when another run is picked, or when the form's state was dropped
        # (Streamlit forgets a widget's value while its tab is closed).
        if st.session_state.get("_runs_fork_for") != s.name or any(K + "fork_" + f not in st.session_state
                                                                   for f in FORK_FIELDS):
            cfg = runs.read_config(Path(s.path)).train
            for f in FORK_FIELDS:
                st.session_state[K + "fork_" + f] = getattr(cfg, f)
            st.session_state["_runs_fork_for"] = s.name
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
            st.form_submit_button("Fork and train", key=K + "fork_submit", on_click=_on_fork, args=(registry, s.path))
        if UI_LIMITS["beta"][1] < st.session_state[K + "fork_beta"]:
            st.caption("β above the sidebar's range, kept from the run.")


def _exports(s: runs.RunSummary) -> None:
    with st.expander("Export"):
        st.caption("The zip holds the whole run (config.json with seed and library versions, metrics, checkpoint); "
                   f"on another machine `python -m vae_core train --resume {s.name}.zip` continues it.")
        cols = st.columns(5)
        files = [("Metrics (CSV)", metrics_csv_bytes, "-metrics.csv", "text/csv", "csv"),
                 ("Samples (PNG)", samples_png, "-samples.png", "image/png", "samples"),
                 ("Reconstructions (PNG)", reconstructions_png, "-reconstructions.png", "image/png", "recon"),
                 ("Checkpoint (.pt)", checkpoint_bytes, "-checkpoint.pt", "application/octet-stream", "ckpt"),
                 ("Whole run (.zip)", zip_bytes, ".zip", "application/zip", "zip")]
        for col, (label, make, suffix, mime, key) in zip(cols, files):
            # Deferred: the bytes are made when the button is clicked, not on every rerun.
            col.download_button(label, functools.partial(make, s.path), file_name=s.name + suffix, mime=mime,
                                key=K + "dl_" + key, on_click="ignore", width="stretch")


def _rename_delete(registry: Registry, runs_dir: Path, s: runs.RunSummary) -> None:
    pending = st.session_state.get("_runs_delete") == s.name
    with st.expander("Rename or delete", expanded=pending):
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        typed = c1.text_input("New name", key=K + "rename_to", placeholder=s.name,
                              help="Letters, digits, '.', '_', '-', '=' and '+'; anything else becomes '-'")
        c2.button("Rename", key=K + "rename", disabled=not typed, on_click=_on_rename,
                  args=(registry, runs_dir, s.name), width="stretch")
        if typed:
            try:
                st.caption(f"Will be saved as `{runs.sanitize_name(typed)}`.")
            except ConfigError as e:
                st.caption(f"⚠ {e}")
        if not pending:
            st.button("Delete…", key=K + "delete", on_click=_on_delete, args=(s.name,),
                      help="Asks for confirmation first")
            return
        st.warning(f"Delete **{s.name}**? Its checkpoint, metrics and config are removed from disk; "
                   "this cannot be undone.")
        c1, c2, _ = st.columns([1, 1, 3])
        c1.button("Yes, delete", key=K + "delete_confirm", type="primary", on_click=_on_delete_confirmed,
                  args=(registry, runs_dir, s.name), width="stretch")
        c2.button("Cancel", key=K + "delete_cancel", on_click=_on_delete, args=(None,), width="stretch")
