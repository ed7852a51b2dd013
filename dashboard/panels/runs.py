"""The Runs tab: every saved run in a table; tick rows to act on a run or compare several.

The table lists everyone's runs (this server's sessions, the CLI, other processes) through
lab.list_runs, which reads only each run's small files (config.json, status.json and the test
lines of metrics.jsonl; never a checkpoint), so 200 runs list in well under a second; "Only mine"
keeps those this session started. The first ticked run gets the actions
(dashboard/panels/run_actions.py); two or more are compared (dashboard/panels/compare.py). Runs
live in the server's one Lab; this tab keeps only UI choices (ticked run names, a pending delete)
in st.session_state.
"""
from __future__ import annotations

import datetime as dt
import time
from typing import Any

import streamlit as st

from dashboard.common import md_text
from dashboard.panels import compare, run_actions
from dashboard.panels.run_actions import K, STATUS, notice, owner_text, parent_text, select
from dashboard.state import session_id
from vae_core.lab import Lab, RunSummary, UserError

TABLE = K + "table"
MAX_UPLOAD_MB = 200


# ------------------------------------------------------------------ the table

def format_when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def beta_text(s: RunSummary) -> str:
    """The β a run trains with now, and where it started when it was moved live."""
    moved = s.beta_start is not None and s.beta_start != s.beta
    return f"{s.beta:g}" + (f" (started at {s.beta_start:g})" if moved else "")


def dataset_label(name: str) -> str:
    """A dataset as the table shows it: a folder by its last part (no server path in the page)."""
    return "folder: " + name.rstrip("/").rsplit("/", 1)[-1] if name.startswith("folder:") else name


def table_rows(summaries: list[RunSummary], me: str = "") -> list[dict[str, Any]]:
    """The runs table's rows, in the order given (list_runs: newest first); `me` is this session's id."""
    return [{"Name": s.name, "Dataset": dataset_label(s.dataset), "Arch": s.arch, "Latent D": s.latent_dim or None,
             "β": beta_text(s), "Epochs": f"{s.epochs_done} / {s.epochs_planned}", "Best test ELBO": s.best_test_elbo,
             "Status": STATUS.get(s.status, s.status), "When": format_when(s.created), "Parent": parent_text(s.parent),
             "Owner": owner_text(s.owner, me), "Host": s.host or ""}
            for s in summaries]


def _table(summaries: list[RunSummary]) -> list[RunSummary]:
    """Draw the table; return the ticked runs, in table order.

    Selections are kept by run name: the table's own selection is row positions, which shift when a
    run is added, deleted or renamed, and vanish while another tab is open (lazy tabs).
    """
    names = [s.name for s in summaries]
    shown = st.session_state.get("_runs_names")
    if TABLE in st.session_state and shown is not None:  # rows of the table as it was last drawn
        wanted = [shown[i] for i in st.session_state[TABLE]["selection"]["rows"] if 0 <= i < len(shown)]
    else:  # the table was not drawn last time (another tab was open), or an action chose the ticks
        wanted = st.session_state.get("_runs_selected", [])
    wanted = [n for n in wanted if n in names]
    if TABLE not in st.session_state or shown != names:
        st.session_state[TABLE] = {"selection": {"rows": [names.index(n) for n in wanted], "columns": [],
                                                 "cells": []}}
    st.session_state["_runs_names"] = names
    event = st.dataframe(table_rows(summaries, session_id()), key=TABLE, on_select="rerun", selection_mode="multi-row",
                         hide_index=True, column_config={
                             "Name": st.column_config.TextColumn(width="medium", pinned=True),
                             "β": st.column_config.NumberColumn(format="%g"),
                             "Best test ELBO": st.column_config.NumberColumn(
                                 format="%.2f", help="Highest test-set ELBO after any epoch, nats per example"),
                             "Epochs": st.column_config.TextColumn(help="Done / planned"),
                             "Parent": st.column_config.TextColumn(help="The run this one was forked from"),
                             "Owner": st.column_config.TextColumn(
                                 help="Who may resume or steer it: you, another session, or anyone (a CLI run). "
                                      "Anyone may open, compare or fork any run"),
                             "Host": st.column_config.TextColumn(help="The machine that last trained it"),
                         })
    rows = [i for i in event.selection.rows if 0 <= i < len(summaries)]
    picked = [summaries[i] for i in sorted(rows)]
    st.session_state["_runs_selected"] = [s.name for s in picked]
    return picked


def _on_import(lab: Lab) -> None:
    upload = st.session_state.get(K + "import")
    if upload is None:
        return
    if upload.size > MAX_UPLOAD_MB * 2**20:
        notice("error", f"{md_text(upload.name)} is {upload.size / 2**20:.0f} MB; a run zip may be at most {MAX_UPLOAD_MB} MB.")
        return
    try:
        name = lab.import_zip(upload.getvalue())
    except UserError as e:
        notice("error", f"Could not import {md_text(upload.name)}: {md_text(e)}")
        return
    select([name])
    notice("success", f"Imported **{md_text(upload.name)}** as **{md_text(name)}**; it is ticked in the table below.")


# ------------------------------------------------------------------ ready-made examples

def _on_example(lab: Lab, name: str) -> None:
    """Copy a shipped example into the runs folder (Lab.import_zip: checked like any upload) and show it."""
    example = next((e for e in lab.example_runs() if e.name == name), None)
    if example is None:
        notice("error", f"The example {name} is no longer in the examples folder.")
        return
    try:
        run = lab.import_zip(example.path, name=example.name)
    except UserError as e:
        notice("error", f"Could not open the example {name}: {e}")
        return
    lab.show(session_id(), run)  # the sidebar follows the shown run by itself (controls.reconcile)
    select([run])
    text = (f"Opened the example **{run}**, a copy in the runs folder: the Training, Explore and Evidence tabs "
            "show it. It is ticked below to resume or fork.")
    if example.note:
        notice("warning", f"{text} {example.note}")
    else:
        notice("success", text)


def _examples(lab: Lab, *, first: bool) -> None:
    """The shipped example runs, one click each; prominent on a first page, folded away once runs exist."""
    examples = lab.example_runs()
    if not examples:
        return
    with st.container(border=True) if first else st.expander("Try an example run"):
        if first:
            st.markdown("**Try an example** — explore a trained run before anything trains.")
        st.caption("Small runs made with this project's own command line (`examples/make_examples.sh`) and shipped "
                   "with it. Open copies one into the runs folder, where it can be explored, resumed or forked.")
        for ex in examples:
            c1, c2 = st.columns([5, 1], vertical_alignment="center")
            # Names are [a-z0-9-] (examples.SAFE_NAME) and the descriptions are the project's own.
            c1.markdown(f"**{ex.name}** · {ex.about}")
            if ex.note:
                c1.caption(f"⚠ Needs {ex.dataset}, not on this machine.")
            c2.button("Open", key=f"{K}example_{ex.name}", on_click=_on_example, args=(lab, ex.name),
                      width="stretch", help=f"{ex.dataset}, {ex.latent_dim} latents, β {ex.beta:g}, "
                                            f"{ex.epochs} epochs; {ex.size_bytes / 2**20:.1f} MB")


# ------------------------------------------------------------------ drawing

def render(lab: Lab) -> None:
    """The Runs tab."""
    runs_dir = lab.runs_dir
    st.markdown("Every run saved under the runs folder, from any session of this dashboard or the command line, "
                "newest first. **Tick** a row (box at its left) to open, fork, export, rename or delete that run, "
                "or resume one of yours; tick two or more to compare them.")
    message = st.session_state.pop("_runs_notice", None)  # left by an action's callback
    if message:
        getattr(st, message[0])(message[1])
    t0 = time.perf_counter()
    everyone = lab.list_runs()
    ms = (time.perf_counter() - t0) * 1000
    mine_only = st.toggle("Only mine", key=K + "mine", help="Only the runs this browser tab started or resumed")
    me = session_id()
    summaries = [s for s in everyone if s.owner == me] if mine_only else everyone
    if not summaries:
        st.info("You have started no runs in this tab yet: untick **Only mine** to see everyone's." if everyone else
                f"No runs in `{runs_dir}` yet. Train one (sidebar), run `python -m vae_core train`, open an "
                "example, or import a zip.")
        _examples(lab, first=not everyone)
        _import(lab)
        return
    picked = _table(summaries)
    c1, c2 = st.columns([4, 1])
    n = len(summaries)
    c1.caption(f"{n} run{'' if n == 1 else 's'} in `{runs_dir.resolve()}`"
               + (f" (of {len(everyone)})" if len(everyone) != n else "") + f" · listed in {ms:.0f} ms. "
               "The table refreshes when you act; training progress shows live in the Training tab.")
    c2.button("Refresh", key=K + "refresh", icon=":material/refresh:", width="stretch")
    _import(lab)
    _examples(lab, first=False)
    if not picked:
        return
    target = picked[0]
    if len(picked) > 1:
        names = [s.name for s in picked]
        chosen = st.selectbox("Act on", names, key=K + "target", help="The actions below apply to this ticked run")
        target = picked[names.index(chosen)] if chosen in names else target
    run_actions.render(lab, target)
    if len(picked) > 1:
        st.divider()
        compare.render(lab, [s.name for s in picked])
    else:
        st.caption("Tick a second run to compare them.")


def _import(lab: Lab) -> None:
    with st.expander("Import a run (.zip)"):
        st.caption(f"A zip exported here or with the CLI (config.json, metrics.jsonl, checkpoint.pt), at most "
                   f"{MAX_UPLOAD_MB} MB. It is checked before it is kept: only those files are unpacked, into a new "
                   "run folder, and the checkpoint must load as plain weights.")
        st.file_uploader("Run zip", type=["zip"], key=K + "import", max_upload_size=MAX_UPLOAD_MB,
                         on_change=_on_import, args=(lab,))
