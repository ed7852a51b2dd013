"""Sweeps: a grid of β × latent size (× seeds) trained as runs of one sweep, and what they found.

A sweep lives in `<runs_dir>/.sweeps/<id>/`: sweep.json (the grid, the base settings, the executor,
who drives it and its heartbeat), cancel.json once someone cancels it, and one log per run. Its runs
are ordinary run directories under runs_dir, named `<id>-b<β>-z<D>[-s<seed>]`, whose config.json
records {"sweep": {"id", "grid", "point"}} (older runs have no such key and load as before). Each
run trains in its own `python -m vae_core train --resume <run>` process, started by the executor
(sweep_exec.py: a local pool, or Ray Tune on a cluster), so a sweep that was interrupted resumes by
training only the runs that have not finished.

Importing this module does not import torch: the dashboard reads sweep status through the Lab.
"""
from __future__ import annotations

import datetime as dt
import itertools
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import runs
from .config import LIMITS, ConfigError, RunConfig
from .runs import RunFileError

SWEEPS_DIR, MANIFEST, CANCEL = ".sweeps", "sweep.json", "cancel.json"
MAX_POINTS = 200  # runs in one sweep: a typo such as --seeds 100 must not start 900 processes
POLL_S = 0.5  # how often a run's watcher looks for a cancel request
SWEEP_STATES = ("running", "finished", "failed", "cancelled", "interrupted")


class SweepError(RuntimeError):
    """A sweep cannot start or go on; the message says why in one line."""


# ------------------------------------------------------------------ the grid

@dataclass(frozen=True)
class Point:
    """One run of a sweep: its name and the grid values it trains with."""

    name: str
    beta: float
    latent_dim: int
    seed: int

    def config(self, base: RunConfig) -> RunConfig:
        return base.replace(beta=self.beta, latent_dim=self.latent_dim, seed=self.seed)


@dataclass(frozen=True)
class Grid:
    betas: tuple[float, ...]
    latent_dims: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)

    def to_dict(self) -> dict[str, Any]:
        return {"beta": list(self.betas), "latent_dim": list(self.latent_dims), "seed": list(self.seeds)}

    def points(self, sweep_id: str) -> list[Point]:
        out = []
        for beta, d, seed in itertools.product(self.betas, self.latent_dims, self.seeds):
            name = f"{sweep_id}-b{beta:g}-z{d}" + (f"-s{seed}" if len(self.seeds) > 1 else "")
            out.append(Point(runs.sanitize_name(name), beta, d, seed))
        return out


def make_grid(betas: Any, latent_dims: Any, seeds: int = 1, *, first_seed: int = 0) -> Grid:
    """A checked grid from lists (or comma-separated text, as the CLI takes them); raises ConfigError."""
    b = tuple(dict.fromkeys(_numbers(betas, "beta", float)))
    d = tuple(dict.fromkeys(_numbers(latent_dims, "latent-dim", int)))
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be a whole number of at least 1; got {seeds!r}")
    for beta in b:
        RunConfig().replace(beta=beta)  # the config's own range checks, with its message
    for dim in d:
        RunConfig().replace(latent_dim=dim)
    s = tuple(range(first_seed, first_seed + seeds))
    if s[-1] > LIMITS["seed"][1]:
        raise ConfigError(f"seeds {first_seed}..{s[-1]} run past the largest seed {LIMITS['seed'][1]:g}")
    n = len(b) * len(d) * len(s)
    if n > MAX_POINTS:
        raise ConfigError(f"this grid has {n} runs; a sweep may have at most {MAX_POINTS}")
    return Grid(b, d, s)


def _numbers(values: Any, name: str, kind: type) -> list[Any]:
    items = [v.strip() for v in values.split(",")] if isinstance(values, str) else list(values)
    items = [v for v in items if v != ""]
    if not items:
        raise ConfigError(f"{name}: give at least one value (e.g. 0.25,1,4)")
    out = []
    for v in items:
        try:
            x = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: {str(v)[:20]!r} is not a number") from None
        if not math.isfinite(x) or (kind is int and not x.is_integer()):
            raise ConfigError(f"{name}: {str(v)[:20]!r} is not a {'whole ' if kind is int else ''}number")
        out.append(kind(x))
    return out


# ------------------------------------------------------------------ the sweep's own files

def sweeps_root(runs_dir: Path) -> Path:
    return Path(runs_dir) / SWEEPS_DIR


def sweep_dir(runs_dir: Path, sweep_id: str) -> Path:
    return sweeps_root(runs_dir) / runs.sanitize_name(sweep_id)


def new_sweep_id(name: str | None = None) -> str:
    if name:
        return runs.sanitize_name(name)[:60]
    return f"sweep-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def create_sweep(runs_dir: Path, base: RunConfig, grid: Grid, *, sweep_id: str | None = None,
                 owner: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write sweep.json for a new sweep (no run yet) and return it; a sweep of that id must not exist."""
    sid = new_sweep_id(sweep_id)
    for p in grid.points(sid):
        p.config(base)  # every point's settings pass the config's rules before anything is written
    d = sweep_dir(runs_dir, sid)
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        d.mkdir()
    except FileExistsError:
        raise ConfigError(f"a sweep named {sid!r} already exists; resume it with --resume {sid}") from None
    manifest = {"id": sid, "created": time.time(), "grid": grid.to_dict(), "base": base.to_dict(),
                "owner": owner, "options": dict(options or {}), "state": "running", "message": "waiting to start"}
    runs.atomic_write_json(d / MANIFEST, manifest)
    return manifest


def load_sweep(runs_dir: Path, sweep_id: str) -> tuple[dict[str, Any], RunConfig, Grid]:
    """(sweep.json, its base settings, its grid); RunFileError when missing or not a sweep this program wrote."""
    path = sweep_dir(runs_dir, sweep_id) / MANIFEST
    raw, why = runs.json_problem(path)
    if raw is None:
        raise RunFileError(f"no sweep named {sweep_id!r} in {runs_dir}" if why.endswith("is missing")
                           else f"sweep {sweep_id!r}: {why}")
    try:
        base = RunConfig.from_dict(raw.get("base"))
        g = raw.get("grid") or {}
        grid = make_grid(g.get("beta", []), g.get("latent_dim", []), len(g.get("seed", [0])),
                         first_seed=int((g.get("seed") or [0])[0]))
    except (ConfigError, TypeError, ValueError, AttributeError) as e:
        raise RunFileError(f"sweep {sweep_id!r}: sweep.json is not a usable sweep ({str(e)[:150]})") from None
    return raw, base, grid


def update_manifest(runs_dir: Path, sweep_id: str, **changes: Any) -> None:
    path = sweep_dir(runs_dir, sweep_id) / MANIFEST
    raw = runs.read_json_or_empty(path)
    if raw:
        runs.atomic_write_json(path, {**raw, **changes})


def request_cancel(runs_dir: Path, sweep_id: str) -> None:
    """Ask the sweep to stop: its training runs stop (each checkpoints), runs not started yet never start."""
    load_sweep(runs_dir, sweep_id)
    runs.atomic_write_json(sweep_dir(runs_dir, sweep_id) / CANCEL, {"time": time.time(), **runs.my_identity()})


def cancel_requested(runs_dir: Path, sweep_id: str) -> bool:
    return (sweep_dir(runs_dir, sweep_id) / CANCEL).exists()


def clear_cancel(runs_dir: Path, sweep_id: str) -> None:
    (sweep_dir(runs_dir, sweep_id) / CANCEL).unlink(missing_ok=True)


# ------------------------------------------------------------------ one run of a sweep (any executor's worker)

def point_finished(runs_dir: Path, name: str) -> bool:
    return runs.read_status(Path(runs_dir) / name).get("state") == "finished"


def job(runs_dir: Path, sweep_id: str, point: Point, base: RunConfig, grid: Grid, *, owner: str | None = None,
        threads: int | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Everything a worker needs to train one point, as plain values (it travels to Ray workers)."""
    return {"runs_dir": str(Path(runs_dir).resolve()), "sweep": sweep_id, "name": point.name,
            "config": point.config(base).to_dict(), "grid": grid.to_dict(),
            "point": {"beta": point.beta, "latent_dim": point.latent_dim, "seed": point.seed},
            "owner": owner, "threads": threads, "data_dir": data_dir, "root": source_root()}


def source_root() -> str:
    """The folder holding this vae_core: the train processes import the same code as this one."""
    return str(Path(__file__).resolve().parents[1])


def run_point(j: dict[str, Any]) -> dict[str, Any]:
    """Train one point to its end in a `python -m vae_core train --resume` process; return its final numbers.

    Creates the run directory (config.json with the sweep's id and grid) the first time; an
    unfinished run from an earlier attempt continues from its checkpoint; a finished one is left
    alone. A cancel request stops the process (it checkpoints) and returns state "cancelled".
    Raises SweepError when the run fails (the executor may retry it).
    """
    runs_dir, sid, name = Path(j["runs_dir"]), j["sweep"], j["name"]
    run_dir = runs_dir / name
    if cancel_requested(runs_dir, sid):
        return {"name": name, "state": "cancelled"}
    if point_finished(runs_dir, name):
        return {"name": name, "state": "finished", **final_numbers(run_dir)}
    if not (run_dir / runs.CONFIG).exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        extra = {"created": time.time(), "sweep": {"id": sid, "grid": j["grid"], "point": j["point"]}}
        if j.get("owner"):
            extra["owner"] = j["owner"]
        runs.write_config(run_dir, RunConfig.from_dict(j["config"]), **extra)
    _wait_while_trained_elsewhere(run_dir, runs_dir, sid)
    log = sweep_dir(runs_dir, sid) / f"{name}.log"
    cmd = [sys.executable, "-m", "vae_core", "train", "--resume", str(run_dir), "--quiet"]
    if j.get("threads"):
        cmd += ["--threads", str(int(j["threads"]))]
    if j.get("data_dir"):
        cmd += ["--data-dir", str(j["data_dir"])]
    env = dict(os.environ)
    root = j.get("root")
    if root and Path(root, "vae_core").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(log, "ab") as out:
        # Its own session: a Ctrl-C in the sweep's terminal reaches the sweep, which stops its runs in turn.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        cancelled = False
        while proc.poll() is None:
            if not cancelled and cancel_requested(runs_dir, sid):
                proc.send_signal(signal.SIGTERM)  # the run stops at its current step and checkpoints
                cancelled = True
            try:
                proc.wait(POLL_S)
            except subprocess.TimeoutExpired:
                pass
    if cancelled or (proc.returncode != 0 and cancel_requested(runs_dir, sid)):
        return {"name": name, "state": "cancelled"}
    if proc.returncode != 0 or not point_finished(runs_dir, name):
        raise SweepError(f"run {name} ended with exit code {proc.returncode}: {_last_line(log)}")
    return {"name": name, "state": "finished", **final_numbers(run_dir)}


def _wait_while_trained_elsewhere(run_dir: Path, runs_dir: Path, sid: str) -> None:
    """An earlier driver's run may still train (a killed driver leaves its runs going): let it end first."""
    while runs.training_reason(run_dir) is not None and not cancel_requested(runs_dir, sid):
        time.sleep(POLL_S)


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


# ------------------------------------------------------------------ what a sweep found

@dataclass(frozen=True)
class PointStatus:
    """One grid point as the Sweeps view shows it; numbers are None until measured (nats per example)."""

    name: str
    beta: float
    latent_dim: int
    seed: int
    state: str  # "pending" before its run directory exists, else the run's status
    epochs_done: int = 0
    epochs_planned: int = 0
    test_elbo: float | None = None
    recon: float | None = None
    kl: float | None = None
    active_units: int | None = None
    iwae: float | None = None
    iwae_k: int | None = None


@dataclass(frozen=True)
class SweepStatus:
    id: str
    state: str
    message: str
    created: float
    betas: tuple[float, ...]
    latent_dims: tuple[int, ...]
    seeds: tuple[int, ...]
    executor: str
    owner: str | None
    points: tuple[PointStatus, ...] = field(default_factory=tuple)

    def count(self, *states: str) -> int:
        return sum(p.state in states for p in self.points)


_scans: dict[str, tuple[tuple[int, int], int, bool, dict[str, Any]]] = {}  # metrics path -> (file id, offset, ...)
_scans_lock = threading.Lock()


def final_numbers(run_dir: Path) -> dict[str, Any]:
    """The last test row's ELBO, reconstruction, KL and active units, and the tightest IWAE bound recorded.

    Read incrementally: a page polling a sweep of long runs once a second parses only the lines
    appended since its last look (a file replaced by a resume is read again from the start).
    """
    path = Path(run_dir) / runs.METRICS
    key = str(path.absolute())
    try:
        st = path.stat()
    except OSError:
        return {}
    with _scans_lock:
        ino, pos, skipping, out = _scans.get(key, ((0, 0), 0, False, {}))
        if ino != (st.st_dev, st.st_ino) or pos > st.st_size:
            ino, pos, skipping, out = (st.st_dev, st.st_ino), 0, False, {}
        out = dict(out)
        with open(path, "rb") as f:
            lines = runs.MetricLines(f, pos, st.st_size, skipping)
            for line in lines:
                if line is None or not (b'"test"' in line or b'"evidence"' in line):
                    continue
                row, _ = runs.parse_row(line)
                if row is None:
                    continue
                if row["split"] == "test":
                    out.update({k: row.get(src) for k, src in (("test_elbo", "elbo"), ("recon", "recon"),
                                                               ("kl", "kl"), ("active_units", "active_units"))})
                elif row["split"] == "evidence":
                    best = _best_iwae(row)
                    if best is not None:
                        out["iwae"], out["iwae_k"] = best
        _scans[key] = (ino, lines.pos, lines.skipping, out)
        while len(_scans) > 4096:
            _scans.pop(next(iter(_scans)))
    return {k: v for k, v in out.items() if _finite(v)}


def _best_iwae(row: dict[str, Any]) -> tuple[float, int] | None:
    iw = row.get("iwae")
    pairs = list(iw.items()) if isinstance(iw, dict) else list(zip(row.get("ks") or [], iw or []))
    good = []
    for k, v in pairs:
        try:
            if _finite(v):
                good.append((int(k), float(v)))
        except (TypeError, ValueError):
            continue
    if not good:
        return None
    k, v = max(good)
    return v, k


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sweep_status(runs_dir: Path, sweep_id: str) -> SweepStatus:
    """The sweep's state and every grid point's run state and final numbers, from the files."""
    raw, _base, grid = load_sweep(runs_dir, sweep_id)
    sid = raw.get("id") if isinstance(raw.get("id"), str) else sweep_id
    points = []
    for p in grid.points(sid):
        run_dir = Path(runs_dir) / p.name
        if not (run_dir / runs.CONFIG).exists():
            points.append(PointStatus(p.name, p.beta, p.latent_dim, p.seed, "pending"))
            continue
        st = runs.read_status(run_dir)
        state = st.get("state", "unknown")
        if state == "unknown" and "problem" not in st:
            state = "starting"  # its process has not written a status yet
        nums = final_numbers(run_dir)
        points.append(PointStatus(p.name, p.beta, p.latent_dim, p.seed, state, int(st.get("epochs_done") or 0),
                                  int(st.get("epochs_target") or 0), **nums))
    state, message = _sweep_state(raw, runs_dir, sweep_id, points)
    opts = raw.get("options") if isinstance(raw.get("options"), dict) else {}
    owner = raw.get("owner") if isinstance(raw.get("owner"), str) else None
    created = raw.get("created") if _finite(raw.get("created")) else 0.0
    return SweepStatus(sid, state, message, float(created), grid.betas, grid.latent_dims, grid.seeds,
                       str(opts.get("executor", "local")), owner, tuple(points))


def _sweep_state(raw: dict[str, Any], runs_dir: Path, sweep_id: str, points: list[PointStatus]) -> tuple[str, str]:
    state = raw.get("state") if raw.get("state") in SWEEP_STATES else "interrupted"
    message = str(raw.get("message", ""))[:300]
    driver = raw.get("driver") if isinstance(raw.get("driver"), dict) else None
    if state == "running":
        if driver is None:
            if time.time() - float(raw.get("created") or 0) > runs.STALE_S:
                state, message = "interrupted", "its driver never started; resume it"
        elif runs.writer_gone(driver):
            state, message = "interrupted", "the process driving it ended; resume it to finish the missing runs"
    if state == "running" and cancel_requested(runs_dir, sweep_id):
        message = "cancelling: its runs stop at their next step"
    if state == "finished" and any(p.state != "finished" for p in points):
        state = "interrupted"
    return state, message


def list_sweeps(runs_dir: Path) -> list[SweepStatus]:
    """Every sweep under runs_dir, newest first; one whose files cannot be read is left out."""
    root = sweeps_root(runs_dir)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if (d / MANIFEST).is_file():
            try:
                out.append(sweep_status(runs_dir, d.name))
            except (RunFileError, ConfigError, OSError):
                continue
    return sorted(out, key=lambda s: s.created, reverse=True)
