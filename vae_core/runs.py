"""Run directories on disk: config.json, metrics.jsonl, checkpoint.pt, status.json.

Everything is written so that a SIGKILL at any moment leaves a run that loads:
config, status and checkpoint are replaced atomically (temp file + rename), and
metrics are appended a line at a time and flushed. Temp files a kill leaves behind
are removed when the run is next opened or trained.

Everything read from a run directory is checked before it is used (a run may come from a zip,
another machine or a hand edit): a run with a bad field lists as "unreadable: <why>" and can be
deleted; it never breaks the listing of the others. JSON files and metrics lines are read up to a
size cap, so one huge file costs a bounded amount of memory.
"""
from __future__ import annotations

import collections
import datetime as dt
import json
import math
import os
import platform
import re
import secrets
import shutil
import socket
import stat as stat_mod
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .config import ConfigError, RunConfig

CHECKPOINT_VERSION = 1
CONFIG, METRICS, CHECKPOINT, STATUS = "config.json", "metrics.jsonl", "checkpoint.pt", "status.json"
CONTROL, LOCK = "control.json", "train.lock"  # steering written by any process; held by the one that trains
HOST = socket.gethostname()
# The training process rewrites status.json at least this often (a heartbeat thread, not the loop, so a
# long evaluation does not stop it). A run whose heartbeat is older than STALE_S reads as interrupted:
# the only test that works across machines; on this host a process that is gone (or whose PID now names
# another process: its start time differs) says so at once.
HEARTBEAT_S = 2.0
STALE_S = 30.0
FUTURE_S = 600.0  # a heartbeat further ahead of this clock than this is not believed (a forged or broken one)
ACTIVE_STATES = ("running", "paused", "queued")
KNOWN_STATES = ("idle", "running", "paused", "queued", "finished", "stopped", "failed", "interrupted")
MAX_JSON_BYTES = 1 << 20  # config.json, status.json, control.json, train.lock: a few kB when written here
MAX_METRICS_LINE = 1 << 20  # one metrics row is < 10 kB; a longer line is skipped, never parsed
TEMP_AGE_S = 60.0  # a temp file this old is no write in progress: any reader may remove it
_NAME_OK = re.compile(r"[^A-Za-z0-9._=+-]+")


class RunFileError(RuntimeError):
    """A run file is missing, corrupt, of the wrong version or unsafe; the message names the file."""


def default_runs_dir() -> Path:
    return Path(os.environ.get("VAE_RUNS_DIR", "runs"))


def sanitize_name(name: str) -> str:
    """A safe single path component: no separators, no '..', no leading dots, at most 100 characters."""
    clean = _NAME_OK.sub("-", str(name)).strip("-.")
    clean = re.sub(r"\.{2,}", ".", clean)[:100].strip("-.")
    if not clean:
        raise ConfigError(f"run name {name!r} has no usable characters; use letters, digits, '-', '_' or '.'")
    return clean


def default_name(config: RunConfig) -> str:
    t = config.train
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dataset = t.dataset if not t.dataset.startswith("folder:") else \
        "folder-" + (Path(t.dataset[len("folder:"):].rstrip("/\\")).name or "root")  # no path in a run's name
    return sanitize_name(f"{dataset}-z{config.model.latent_dim}-b{t.beta:g}-{stamp}")


def resolve_run(runs_dir: Path, name: str) -> Path:
    """The directory of a run by name: runs_dir / <the sanitised name>, never anything outside runs_dir.

    The name is one safe path component, so the path lies in runs_dir whatever the name; its last
    component is not resolved, so a run folder that is a link can be named (to rename or delete the
    link itself). Training through a link that leads out of runs_dir is refused (link_problem).
    """
    return Path(runs_dir).resolve() / sanitize_name(name)


def link_problem(run_dir: Path) -> str | None:
    """Why a run folder must not be trained in: it is a link leading out of its parent folder (None: fine)."""
    run_dir = Path(run_dir)
    if not run_dir.is_symlink():
        return None
    try:
        target = run_dir.resolve(strict=True)
    except (OSError, RuntimeError):
        return "is a link that leads nowhere"
    if target.parent != run_dir.parent.resolve():
        return "is a link to a folder outside the runs directory"
    return None


def create_run_dir(runs_dir: Path, config: RunConfig, name: str | None = None) -> Path:
    """Make a new, uniquely named run directory holding config.json."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = sanitize_name(name) if name else default_name(config)
    for i in range(1000):
        candidate = resolve_run(runs_dir, base if i == 0 else f"{base}-{i + 1}")
        try:
            candidate.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise ConfigError(f"could not find a free run name near {base!r}")
    return candidate


def library_versions() -> dict[str, str]:
    import numpy
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` at once (temp file, fsync, rename); `mode`: the new file's permissions."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_config(run_dir: Path, config: RunConfig, **extra: Any) -> None:
    atomic_write_json(Path(run_dir) / CONFIG, {**config.to_dict(), **extra, "versions": library_versions()})


# ------------------------------------------------------------------ reading and checking what a run holds

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v: Any) -> str:
    """A hostile value described for a message: short plain words and numbers as they are, else only its kind
    (a message is shown in the page; what a file holds must not become markup or a long line there)."""
    if v is None or isinstance(v, (bool, int, float)):
        text = repr(v)
        return text if len(text) <= 24 else f"a number of {len(text)} digits"
    if isinstance(v, str):
        return repr(v) if len(v) <= 24 and re.fullmatch(r"[\w .:+-]*", v) else f"a text of {len(v)} characters"
    return f"a {'JSON object' if isinstance(v, dict) else 'list' if isinstance(v, list) else type(v).__name__}"


def json_problem(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON object in `path`, None) or (None, why not) with the file's name, not its full path."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if not stat_mod.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None, f"{path.name} is not a regular file"
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except OSError as e:
        return None, f"{path.name} cannot be read ({e.strerror or type(e).__name__})"
    if len(raw) > MAX_JSON_BYTES:
        return None, f"{path.name} is larger than {MAX_JSON_BYTES // 1024} kB"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except RecursionError:
        return None, f"{path.name} is not valid JSON (nested too deeply)"
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"{path.name} is not valid JSON ({str(e)[:100]})"
    if not isinstance(obj, dict):
        return None, f"{path.name} must hold a JSON object"
    return obj, None


def read_json(path: Path) -> dict[str, Any]:
    obj, why = json_problem(path)
    if why is not None:
        raise RunFileError(f"{Path(path).parent}{os.sep}{why}")  # the reasons start with the file's name
    return obj


def config_problem(raw: dict[str, Any]) -> tuple[RunConfig | None, str | None]:
    """(the run's config, None) or (None, why) for config.json's contents: its settings and every other field read."""
    try:
        cfg = RunConfig.from_dict({"model": raw.get("model", {}), "train": raw.get("train", {})})
    except (ConfigError, TypeError, AttributeError, ValueError, OverflowError, RecursionError) as e:
        return None, f"config.json: {str(e)[:200]}"
    created = raw.get("created")
    if created is not None and not (_is_num(created) and 0 < created < 1e11):
        return None, f"config.json: created is {_short(created)}, not a time in seconds"
    parent = raw.get("parent")
    if parent is not None and not (isinstance(parent, dict) and isinstance(parent.get("run"), str)
                                   and (parent.get("step") is None or (_is_int(parent["step"]) and parent["step"] >= 0))):
        return None, f"config.json: parent is {_short(parent)}, not a run and a step"
    owner = raw.get("owner")
    if owner is not None and not isinstance(owner, str):
        return None, f"config.json: owner is {_short(owner)}, not a session id"
    sweep = raw.get("sweep")  # runs of a sweep (vae_core/sweep.py) record its id and grid; older runs have none
    if sweep is not None and not (isinstance(sweep, dict) and isinstance(sweep.get("id"), str)):
        return None, f"config.json: sweep is {_short(sweep)}, not a sweep id and grid"
    return cfg, None


def read_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG
    d = read_json(path)
    try:
        return RunConfig.from_dict({"model": d.get("model", {}), "train": d.get("train", {})})
    except ConfigError as e:
        raise RunFileError(f"{path}: {e}") from None
    except (TypeError, AttributeError, ValueError, OverflowError, RecursionError) as e:
        raise RunFileError(f"{path}: not a run config ({str(e)[:200]})") from None


# What status.json may hold, by field: a bad value makes the run "unreadable", never a crash of the reader.
_COUNT = ("pid_start", "step", "epochs_target", "epochs_done", "total_steps", "steps_per_epoch", "control_seq")
_FINITE = ("heartbeat", "epoch", "samples_per_s", "beta", "beta_effective", "lr", "warmup_epochs", "free_bits")
_TEXT = ("message", "host", "updated", "device")


def status_problem(st: dict[str, Any]) -> str | None:
    """Why status.json's contents cannot be used (None: every field it has is of the right kind)."""
    state = st.get("state")
    if "state" in st and state not in KNOWN_STATES:
        return f"state is {_short(state)}, not one of {', '.join(KNOWN_STATES)}"
    pid = st.get("pid")
    if pid is not None and not (_is_int(pid) and abs(pid) < 2**63):
        return f"pid is {_short(pid)}, not a process id"
    for key in _COUNT:
        v = st.get(key)
        if v is not None and not (_is_int(v) and 0 <= v < 2**53):
            return f"{key} is {_short(v)}, not a whole number"
    for key in _FINITE:
        v = st.get(key)
        if v is not None and not (_is_num(v) and math.isfinite(v)):
            return f"{key} is {_short(v)}, not a finite number"
    eta = st.get("eta_s")
    if eta is not None and not (_is_num(eta) and math.isfinite(eta)):
        return f"eta_s is {_short(eta)}, not a number of seconds"
    for key in _TEXT:
        v = st.get(key)
        if v is not None and not isinstance(v, str):
            return f"{key} is {_short(v)}, not text"
    return None


def write_status(run_dir: Path, state: str, message: str = "", **extra: Any) -> None:
    """status.json with who writes it (host, pid and the process's start time) and when (heartbeat, epoch seconds)."""
    now = time.time()
    atomic_write_json(Path(run_dir) / STATUS, {"state": state, "message": message, **my_identity(),
                                               "heartbeat": now, "updated": dt.datetime.now().isoformat(timespec="seconds"),
                                               **extra})


# ------------------------------------------------------------------ is the writer alive?

def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks after boot: field 22) of /proc/<pid>/stat; None if unreadable."""
    try:
        raw = Path(f"/proc/{int(pid)}/stat").read_bytes()
        fields = raw[raw.rindex(b")") + 2:].split()
        return fields[0].decode(), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def process_start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22); None where unknown."""
    found = _proc_stat(pid)
    return found[1] if found else None


_MY_START: dict[int, int | None] = {}


def my_identity() -> dict[str, Any]:
    """host, pid and pid_start of this process: what tells it from a later process given the same PID."""
    pid = os.getpid()
    if pid not in _MY_START:
        _MY_START[pid] = process_start_time(pid)
    return {"pid": pid, "pid_start": _MY_START[pid], "host": HOST}


def pid_alive(pid: Any, start: Any = None) -> bool:
    """Whether `pid` names a live process on this host, and the same one when its start time `start` is known.

    0, 1's absence, negative numbers and non-numbers are no process (os.kill(-1, 0) would succeed as
    root); a zombie has ended; a PID now held by a process that started at another time was reused.
    """
    if not (_is_int(pid) and 0 < pid < 2**31):
        return False
    found = _proc_stat(pid)
    if found is not None:
        state, started = found
        if state in ("Z", "X"):
            return False
        return not _is_int(start) or start == started
    try:  # no /proc (macOS), or it hides other users' processes
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def writer_gone(st: dict[str, Any], now: float | None = None) -> bool:
    """Whether the process that wrote `st` (status.json or train.lock: host, pid, pid_start, heartbeat) has ended.

    On this host: its PID names no process, or a process that started at another time (reused). On
    any host: its heartbeat is missing, older than STALE_S or implausibly far in the future.
    """
    now = time.time() if now is None else now
    host = st.get("host")
    if host is not None and not isinstance(host, str):
        return True
    if host in (None, HOST) and not pid_alive(st.get("pid"), st.get("pid_start")):
        return True
    beat = st.get("heartbeat")
    if not (_is_num(beat) and math.isfinite(beat)):
        return True
    return not -FUTURE_S <= now - beat <= STALE_S


def read_status(run_dir: Path) -> dict[str, Any]:
    """status.json, checked; an active run whose writing process has ended (writer_gone) reads as 'interrupted'.

    A missing file reads as state 'unknown'; an unreadable one, or one with a bad field, as 'unknown'
    with `problem` saying why (the listing shows such a run as unreadable).
    """
    st, why = json_problem(Path(run_dir) / STATUS)
    if st is None:
        if why == f"{STATUS} is missing":
            return {"state": "unknown", "message": "no readable status.json"}
        return {"state": "unknown", "message": f"unreadable: {why}", "problem": why}
    why = status_problem(st)
    if why is not None:
        return {"state": "unknown", "message": f"unreadable: status.json: {why}", "problem": f"status.json: {why}"}
    if st.get("state") in ACTIVE_STATES and writer_gone(st):
        where = f" on {st.get('host')}" if st.get("host") not in (None, HOST) else ""
        st = {**st, "state": "interrupted",
              "message": f"the process training it{where} ended; resume from the last checkpoint"}
    return st


# ------------------------------------------------------------------ steering and the training lock

def read_control(run_dir: Path) -> dict[str, Any]:
    """control.json ({} if there is none or it is unreadable): live settings and a command, with a sequence number."""
    obj, _ = json_problem(Path(run_dir) / CONTROL)
    if obj is None or not (_is_int(obj.get("seq", 0)) and obj.get("seq", 0) >= 0):
        return {}
    return obj


def write_control(run_dir: Path, *, command: str | None = None, **live: float) -> int:
    """Ask the process training this run to change live settings and/or pause, resume or stop; returns the seq.

    Read-modify-write under an flock, so two writers never lose each other's change; the training
    process applies entries with a seq above the one it acknowledged (status.json: control_seq).
    """
    import fcntl

    if command not in (None, "pause", "resume", "stop"):
        raise ConfigError(f"unknown command {command!r}; use pause, resume or stop")
    run_dir = Path(run_dir)
    with open(run_dir / ".control.lock", "a+") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        ctl = read_control(run_dir)
        seq = (ctl["seq"] if _is_int(ctl.get("seq")) and ctl["seq"] >= 0 else 0) + 1
        ctl.update({k: float(v) for k, v in live.items()})
        ctl.update({"seq": seq, "command": command, "written": time.time(), "by": f"{HOST}:{os.getpid()}"})
        atomic_write_json(run_dir / CONTROL, ctl)
    return seq


class RunBusy(RunFileError):
    """Another live process trains this run; the message says which."""


def _read_lock_fd(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, MAX_JSON_BYTES + 1, 0)
        d = json.loads(raw.decode("utf-8")) if len(raw) <= MAX_JSON_BYTES else {}
    except (OSError, ValueError, RecursionError):
        return {}
    return d if isinstance(d, dict) else {}


def _holder_alive(run_dir: Path, holder: dict[str, Any]) -> bool:
    """Whether the process named in train.lock still trains: writer_gone on it, with the newest heartbeat
    of the lock and of status.json (which the holder rewrites every HEARTBEAT_S)."""
    if not holder:
        return False
    beats = [b for b in (holder.get("heartbeat"), read_status_raw(run_dir).get("heartbeat"))
             if _is_num(b) and math.isfinite(b)]
    return not writer_gone({**holder, "heartbeat": max(beats) if beats else None})


def lock_holder(run_dir: Path) -> dict[str, Any] | None:
    """The live process that holds this run's train.lock ({host, pid, ...}), or None."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        holder = _read_lock_fd(fd)
    finally:
        os.close(fd)
    return holder if _holder_alive(Path(run_dir), holder) else None


def _busy_message(run_dir: Path, holder: dict[str, Any]) -> str:
    name = Path(run_dir).name
    if holder.get("host") == HOST and holder.get("pid") == os.getpid():
        return f"run {name!r} is already training in this process"
    if _is_int(holder.get("pid")):
        return (f"run {name!r} is being trained by process {holder['pid']} on {holder.get('host')}; "
                "stop it there first")
    return f"run {name!r} is being trained by another process; stop it there first"


class RunLock:
    """train.lock: at most one process trains a run.

    The holder keeps an flock on the file for as long as it trains (the kernel drops it when the
    process dies, however it dies) and writes who it is into it: host, pid, the process's start time
    and a heartbeat. A second process is refused while the flock is held, or while the named holder
    lives (a holder on another machine, where an flock may not reach: its heartbeat is fresh). A lock
    whose holder has ended is taken over; its run's leftover temp files are removed then.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        why = link_problem(self.run_dir)
        if why is not None:
            raise RunFileError(f"run {self.run_dir.name!r} {why}; training through it would write outside the runs "
                               "directory, so it is refused (copy the run into the runs directory instead)")
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                if self.path.is_symlink():  # not a lock this program made: a link could make us write elsewhere
                    self.path.unlink()
                    continue
                raise RunFileError(f"cannot create {LOCK} in run {self.run_dir.name!r}: {e.strerror or e}") from None
            flocked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_lock_fd(fd)
                os.close(fd)
                raise RunBusy(_busy_message(self.run_dir, holder)) from None
            except OSError:  # a file system without flock (some network mounts): the holder's identity decides
                flocked = False
            try:  # a holder that released it unlinked the file we opened: lock the file now at the path instead
                now_there = os.stat(self.path, follow_symlinks=False)
                same = (now_there.st_ino, now_there.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            holder = _read_lock_fd(fd)
            # We hold the flock, so no process on this host holds it: a holder named here that recorded its
            # start time (this program does) has ended. Others (another host, an older program) prove it
            # by their heartbeat.
            stale = ((flocked and holder.get("host") == HOST and _is_int(holder.get("pid_start")))
                     or not _holder_alive(self.run_dir, holder))
            if holder and not stale:
                os.close(fd)
                raise RunBusy(_busy_message(self.run_dir, holder))
            me = json.dumps({**my_identity(), "heartbeat": time.time()}).encode()
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, me, 0)
            except OSError as e:  # a full or read-only disk
                os.close(fd)
                raise RunFileError(f"cannot write {LOCK} in run {self.run_dir.name!r}: {e.strerror or e}") from None
            self._fd, self.held = fd, True
            clean_temp_files(self.run_dir, min_age_s=0.0, names=(CHECKPOINT, METRICS))  # no writer but us now
            clean_temp_files(self.run_dir)
            return self
        raise RunBusy(f"could not take {LOCK} of run {self.run_dir.name!r}; other processes keep replacing it")

    def release(self) -> None:
        if not self.held or self._fd is None:
            return
        try:
            here = os.stat(self.path, follow_symlinks=False)
            mine = os.fstat(self._fd)
            if (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev):
                self.path.unlink()  # while the flock is still ours: a waiter that opened it retries on the new file
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd, self.held = None, False


def clean_temp_files(run_dir: Path, *, min_age_s: float = TEMP_AGE_S, names: tuple[str, ...] | None = None) -> int:
    """Remove the temp files of writes a kill interrupted (.checkpoint.pt.<random>.tmp and the like).

    Only files at least `min_age_s` old go (a write in progress takes far less), unless the caller
    holds the run's lock and names the files only the trainer writes (`names`, min_age_s=0).
    Returns how many were removed.
    """
    removed, now = 0, time.time()
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return 0
    for e in entries:
        if not (e.name.startswith(".") and e.name.endswith(".tmp")):
            continue
        if names is not None and not any(e.name.startswith(f".{n}.") for n in names):
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if not stat_mod.S_ISREG(st.st_mode) or now - st.st_mtime < min_age_s:
                continue
            os.unlink(e.path)
            removed += 1
        except OSError:
            continue
    return removed


def file_version(path: Path) -> tuple[int, int] | None:
    """(mtime in ns, size) of a file, None when it is missing: what readers compare to see that it changed."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def read_json_or_empty(path: Path) -> dict[str, Any]:
    obj, _ = json_problem(path)
    return obj or {}


def read_status_raw(run_dir: Path) -> dict[str, Any]:
    return read_json_or_empty(Path(run_dir) / STATUS)


class MetricsWriter:
    """Appends one JSON object per line and flushes it, so a crash loses at most the line being written."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row, allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


_ROW_NUMBERS = ("epoch", "loss", "beta", "beta_effective", "lr", "free_bits", "wall_time", "samples_per_s")
_ROW_LISTS = ("kl_per_dim", "mu_variance")


def row_problem(row: Any) -> str | None:
    """Why a metrics line's value is not a usable row (None: it is one). NaN and infinities are allowed:
    a diverged run logs them."""
    if not isinstance(row, dict):
        return f"a {type(row).__name__}, not an object"
    step = row.get("step")
    if not (_is_int(step) and 0 <= step < 2**53):
        return f"step is {_short(step)}"
    split = row.get("split")
    if not isinstance(split, str):
        return f"split is {_short(split)}"
    for key in ("elbo", "recon", "kl") if split in ("train", "test") else ():
        if key in row and not _is_num(row[key]):
            return f"{key} is {_short(row[key])}"
    for key in _ROW_NUMBERS:
        if row.get(key) is not None and not _is_num(row[key]):
            return f"{key} is {_short(row[key])}"
    for key in _ROW_LISTS:
        v = row.get(key)
        if v is not None and not (isinstance(v, list) and all(_is_num(x) for x in v)):
            return f"{key} is not a list of numbers"
    if row.get("active_units") is not None and not _is_int(row["active_units"]):
        return f"active_units is {_short(row['active_units'])}"
    return None


class MetricLines:
    """The complete lines of a file between byte offsets, each read with at most MAX_METRICS_LINE + 1 bytes
    in memory. An overlong line comes out as None, unread (it is skipped in bounded pieces); a last line
    without its newline (being written) is left for the next read: `pos` stops before it."""

    def __init__(self, f: Any, pos: int, end: int, skipping: bool = False) -> None:
        self.f, self.pos, self.end, self.skipping = f, pos, end, skipping

    def __iter__(self) -> Iterator[bytes | None]:
        cap = MAX_METRICS_LINE
        self.f.seek(self.pos)
        while self.pos < self.end:
            line = self.f.readline(min(cap + 1, self.end - self.pos))
            if not line:
                break
            if self.skipping:  # the rest of an overlong line
                self.pos += len(line)
                self.skipping = not line.endswith(b"\n")
                continue
            if line.endswith(b"\n"):
                self.pos += len(line)
                yield line
            elif len(line) > cap:
                self.pos += len(line)
                self.skipping = True
                yield None
            else:
                break


def parse_row(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(the row a metrics line holds, None) or (None, why it is not one)."""
    try:
        row = json.loads(line)
    except RecursionError:
        return None, "nested too deeply"
    except ValueError:
        return None, "not valid JSON"
    why = row_problem(row)
    return (None, why) if why else (row, None)


def _regular_size(path: Path) -> int | None:
    """The size of `path` if it is a regular file (not a FIFO, a device or a folder); None otherwise."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat_mod.S_ISREG(st.st_mode) else None


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str], bool]:
    """(valid rows, what was skipped and why, whether the file ends in a complete line)."""
    size = _regular_size(path)
    if size is None:
        return [], [], True
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    with open(path, "rb") as f:
        lines = MetricLines(f, 0, size)
        for i, line in enumerate(lines, 1):
            if line is None:
                skipped.append(f"line {i} (longer than {MAX_METRICS_LINE} bytes)")
                continue
            if not line.strip():
                continue
            row, why = parse_row(line)
            if row is None:
                skipped.append(f"corrupt line {i} ({why})")
            else:
                rows.append(row)
        whole = lines.pos >= size and not lines.skipping
    return rows, skipped, whole


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All metric rows; a corrupt, overlong or ill-typed line (e.g. half-written at a crash) is skipped with a warning."""
    path = Path(run_dir) / METRICS
    rows, skipped, whole = _read_rows(path)
    for what in skipped[:5]:
        warnings.warn(f"{path}: skipped {what}", RuntimeWarning, stacklevel=2)
    if not whole:
        warnings.warn(f"{path}: skipped corrupt line {len(rows) + len(skipped) + 1} (no end of line)",
                      RuntimeWarning, stacklevel=2)
    return rows


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only rows up to `step` (what a checkpoint covers).

    The file is rewritten (atomically, keeping its permissions) only when something must go: rows
    past the step, or lines that are not rows (a half-written last line would glue onto the next).
    Callers hold the run's lock: no other process appends to it meanwhile.
    """
    path = Path(run_dir) / METRICS
    if _regular_size(path) is None:
        return
    rows, skipped, whole = _read_rows(path)
    kept = [m for m in rows if m["step"] <= step]
    if len(kept) == len(rows) and not skipped and whole:
        return
    mode = stat_mod.S_IMODE(os.stat(path).st_mode)
    atomic_write_bytes(path, "".join(json.dumps(m) + "\n" for m in kept).encode(), mode=mode)


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write checkpoint.pt atomically. state holds only tensors, numbers, strings, lists and dicts."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buf)
    atomic_write_bytes(Path(run_dir) / CHECKPOINT, buf.getvalue())
    from .model_files import save_model_files  # the same weights as model.safetensors + model.json (no pickle)

    save_model_files(Path(run_dir), state)


CHECKPOINT_SLACK_BYTES = 1 << 20  # beyond model + Adam's two moments: the generator, step counters, metadata
_PICKLE_MAX_BYTES = 1 << 20  # data.pkl: names, numbers and settings only


def _model_shapes(model_config: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Name -> (shape, dtype) of the state dict a model config needs, built on the meta device (no memory)."""
    import torch

    from .models import build_model

    with torch.device("meta"):
        model = build_model(model_config)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def checkpoint_budget(model_config: Any) -> int:
    """The most tensor bytes a checkpoint of this model holds: weights, Adam's two moments, and slack."""
    import torch

    weights = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                  for shape, dtype in _model_shapes(model_config).values())
    return 3 * weights + CHECKPOINT_SLACK_BYTES


def _check_checkpoint_zip(path: Path, budget: int | None) -> None:
    """Refuse, before torch allocates anything, a checkpoint whose storages could inflate past the model's size.

    torch.save writes every entry uncompressed (stored), so an entry's size is bytes that are in
    the file. A compressed entry (a 7 MB file can inflate to 1 GiB), sizes that add up to more
    than the file, or storages larger than the run's model needs mean a crafted file.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise RunFileError(f"{path} is not a checkpoint written by this program (not a torch zip file: "
                           f"{_one_line(e)})") from None
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        raise RunFileError(f"{path} holds compressed entries, which torch.save never writes; refusing to "
                           "inflate it")
    size = path.stat().st_size
    declared = sum(i.file_size for i in infos)
    if declared > size:
        raise RunFileError(f"{path} declares {declared:,} bytes of entries in a file of {size:,} bytes; "
                           "refusing a corrupt or crafted checkpoint")
    pickles = [i for i in infos if i.filename.endswith("data.pkl")]
    if len(pickles) != 1 or pickles[0].file_size > _PICKLE_MAX_BYTES:
        raise RunFileError(f"{path} is not a checkpoint written by this program (its data.pkl is missing, "
                           "repeated or too large)")
    tensors = sum(i.file_size for i in infos if "/data/" in i.filename)
    if budget is not None and tensors > budget:
        raise RunFileError(f"{path} holds {tensors / 2**20:,.1f} MiB of tensors but the run's model needs at most "
                           f"{budget / 2**20:,.1f} MiB; refusing to load it")


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an error, cut at a word (never mid-word) when it is long."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0].rstrip(",;:")
    return f"{cut} …"


def _budget_from_run(path: Path) -> int | None:
    """The tensor budget of the run whose directory holds this checkpoint (None when config.json is unreadable)."""
    try:
        return checkpoint_budget(read_config(path.parent).model)
    except (RunFileError, ConfigError):
        return None


def validate_checkpoint(path: Path, ckpt: Any) -> dict[str, Any]:
    """Check every field a checkpoint's reader uses; RunFileError names the first bad one, in one line."""
    import torch

    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        found = ckpt.get("version") if isinstance(ckpt, dict) else None
        if not isinstance(ckpt, dict):
            raise RunFileError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint of this program")
        if found is None:
            raise RunFileError(f"{path} has no checkpoint version; this program reads version {CHECKPOINT_VERSION}")
        if isinstance(found, int) and not isinstance(found, bool):
            raise RunFileError(f"{path} has checkpoint version {found}; this program reads version {CHECKPOINT_VERSION}")
        raise RunFileError(f"{path} has a checkpoint version that is not a number ({type(found).__name__} "
                           f"{str(found)[:40]!r}); this program reads version {CHECKPOINT_VERSION}")
    for key in ("model", "config", "step"):
        if key not in ckpt:
            raise RunFileError(f"{path} lacks {key!r}")

    def bad(what: str) -> RunFileError:
        return RunFileError(f"{path}: {what}; refusing a corrupt or crafted checkpoint")

    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**53:
        raise bad(f"'step' must be a whole number of at least 0; got {str(step)[:40]!r}")
    epoch = ckpt.get("epoch", 0.0)
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not math.isfinite(epoch) or epoch < 0:
        raise bad(f"'epoch' must be a finite number of at least 0; got {str(epoch)[:40]!r}")
    try:
        config = RunConfig.from_dict(ckpt["config"])
    except ConfigError as e:
        raise bad(f"its config is invalid ({_one_line(e)})") from None
    live = ckpt.get("live", {})
    if not isinstance(live, dict):
        raise bad(f"'live' must be a dict of settings; got a {type(live).__name__}")
    from .config import LIVE_FIELDS

    unknown = [str(k)[:40] for k in live if k not in LIVE_FIELDS]
    if unknown:
        raise bad(f"'live' holds unknown setting(s) {', '.join(unknown[:5])}")
    try:  # the config's own rules: a crafted beta of 1e9 is refused like a typed one
        config.replace(**live)
    except ConfigError as e:
        raise bad(f"its live settings are invalid ({_one_line(e)})") from None
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise bad("'model' must map parameter names to tensors")
    want = _model_shapes(config.model)
    if set(model) != set(want):
        missing, extra = sorted(set(want) - set(model)), sorted(set(model) - set(want))
        raise bad("'model' does not fit its config (" + "; ".join(
            p for p in (f"missing {', '.join(missing[:3])}" if missing else "",
                        f"unexpected {', '.join(x[:40] for x in extra[:3])}" if extra else "") if p) + ")")
    for k, (shape, dtype) in want.items():
        if tuple(model[k].shape) != shape or model[k].dtype != dtype:
            raise bad(f"'model' tensor {k} has shape {tuple(model[k].shape)} ({model[k].dtype}); "
                      f"its config needs {shape} ({dtype})")
    if "optimizer" in ckpt and not isinstance(ckpt["optimizer"], dict):
        raise bad("'optimizer' must be a dict")
    gen = ckpt.get("generator")
    if gen is not None and not (isinstance(gen, torch.Tensor) and gen.dtype == torch.uint8 and gen.dim() == 1):
        raise bad("'generator' must be a byte tensor")
    return ckpt


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with weights_only=True: a file carrying pickled code is refused and its code never runs.

    Before torch reads it, the zip's directory is checked (entries stored, sizes within the file
    and within what the run's model needs), so a small crafted file cannot make it allocate
    gigabytes; after, every field is validated (validate_checkpoint).
    """
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise RunFileError(f"{path} is missing")
    if path.stat().st_size == 0:
        raise RunFileError(f"{path} is empty")
    _check_checkpoint_zip(path, _budget_from_run(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise RunFileError(f"{path} cannot be loaded: not enough memory") from None
    except Exception as e:  # UnpicklingError for unsafe payloads, RuntimeError/EOFError for truncation
        reason = _one_line(e)
        if isinstance(e, pickle.UnpicklingError) and ("weights_only" in str(e) or "Unsupported global" in str(e)):
            reason = "it contains objects other than weights, which are never loaded"
        raise RunFileError(f"{path} cannot be loaded: {reason}") from None
    return validate_checkpoint(path, ckpt)


@dataclass
class RunSummary:
    """One row of the runs table, read from the small files only (never the checkpoint)."""

    name: str
    path: str
    dataset: str
    arch: str
    latent_dim: int
    beta: float
    epochs_done: int
    epochs_planned: int
    best_test_elbo: float | None
    last_test: dict[str, Any] | None
    status: str
    message: str
    created: float
    parent: dict[str, Any] | None  # {"run", "step"} of a fork's parent
    error: str | None = None  # why the run cannot be used ("unreadable"): it can still be renamed or deleted
    owner: str | None = None  # the dashboard session that started it (None: the CLI or an older run)
    host: str | None = None
    beta_start: float | None = None  # config.json's β; `beta` is the one it trains with now (status.json)
    sweep: str | None = None  # the id of the sweep this run belongs to (None: a run of its own)


class _Unreadable(Exception):
    """A run file holds something the listing cannot use; the message says what (no server paths)."""


@dataclass
class _Scan:
    """How far the listing read a metrics file, and what the test lines up to there say."""

    ino: tuple[int, int]
    pos: int
    skipping: bool
    tail: bytes  # the bytes just before pos: a file replaced by another (same inode number) shows here
    best: float | None = None
    last: dict[str, Any] | None = None
    tests: int = 0


_scans: "collections.OrderedDict[str, _Scan]" = collections.OrderedDict()
_scans_lock = threading.Lock()
_MAX_SCANS = 4096


def test_rows_summary(run_dir: Path) -> tuple[float | None, dict[str, Any] | None, int]:
    """(best finite test ELBO, the last test row, how many test rows) of a run's metrics.jsonl.

    Read incrementally: a listing parses only the lines appended since the last listing in this
    process (the test lines; train lines are most of the file and are not parsed), and a line longer
    than MAX_METRICS_LINE is skipped unparsed.
    """
    path = Path(run_dir) / METRICS
    key = str(path.absolute())
    try:
        st = os.stat(path)
    except OSError:
        return None, None, 0
    if not stat_mod.S_ISREG(st.st_mode):
        raise _Unreadable(f"{METRICS} is not a regular file")
    with _scans_lock:
        scan = _scans.get(key)
        with open(path, "rb") as f:
            if scan is not None and scan.ino == (st.st_dev, st.st_ino) and scan.pos <= st.st_size:
                f.seek(max(0, scan.pos - len(scan.tail)))
                if f.read(len(scan.tail)) != scan.tail:
                    scan = None
            else:
                scan = None
            if scan is None:
                scan = _Scan((st.st_dev, st.st_ino), 0, False, b"")
            lines = MetricLines(f, scan.pos, st.st_size, scan.skipping)
            for line in lines:
                if line is None or b'"test"' not in line:
                    continue
                row, _ = parse_row(line)
                if row is None or row["split"] != "test":
                    continue
                scan.tests += 1
                scan.last = row
                elbo = row.get("elbo")
                if _is_num(elbo) and math.isfinite(elbo) and (scan.best is None or elbo > scan.best):
                    scan.best = float(elbo)
            scan.pos, scan.skipping = lines.pos, lines.skipping
            f.seek(max(0, scan.pos - 64))
            scan.tail = f.read(min(64, scan.pos))
        _scans[key] = scan
        _scans.move_to_end(key)
        while len(_scans) > _MAX_SCANS:
            _scans.popitem(last=False)
        return scan.best, (dict(scan.last) if scan.last else None), scan.tests


def read_metrics_tail(run_dir: Path) -> list[dict[str, Any]]:
    """Only the per-epoch test rows, found without parsing every train row (they are most lines)."""
    path = Path(run_dir) / METRICS
    size = _regular_size(path)
    if size is None:
        return []
    rows = []
    with open(path, "rb") as f:
        for line in MetricLines(f, 0, size):
            if line is not None and b'"test"' in line:
                row, _ = parse_row(line)
                if row is not None and row["split"] == "test":
                    rows.append(row)
    return rows


def _unreadable_summary(run_dir: Path, why: str, created: float) -> RunSummary:
    return RunSummary(run_dir.name, str(run_dir), "?", "?", 0, float("nan"), 0, 0, None, None, "corrupt",
                      f"unreadable: {why}", created, None, error=why)


def summarize_run(run_dir: Path) -> RunSummary:
    """The run's row of the table; a run with anything unusable in its files lists as 'unreadable: <why>'."""
    run_dir = Path(run_dir)
    try:
        created = run_dir.stat().st_mtime
    except OSError:
        created = 0.0
    try:
        return _summarize(run_dir, created)
    except _Unreadable as e:
        why = str(e)
    except Exception as e:  # noqa: BLE001 - whatever one run's files hold, the other runs still list
        why = f"{type(e).__name__} while reading it"
    return _unreadable_summary(run_dir, why, created)


def _summarize(run_dir: Path, created: float) -> RunSummary:
    why = link_problem(run_dir)
    if why is not None:
        raise _Unreadable(f"the folder {why}; it can be renamed or deleted (the link only)")
    raw, why = json_problem(run_dir / CONFIG)
    if why is not None:
        raise _Unreadable(why)
    cfg, why = config_problem(raw)
    if why is not None:
        raise _Unreadable(why)
    status = read_status(run_dir)
    if status.get("problem"):
        raise _Unreadable(status["problem"])
    best, last, n_tests = test_rows_summary(run_dir)
    beta_now = status.get("beta", cfg.train.beta)
    epochs_done = status.get("epochs_done", n_tests)
    planned = status.get("epochs_target", cfg.train.epochs)
    return RunSummary(run_dir.name, str(run_dir), cfg.train.dataset, cfg.model.arch, cfg.model.latent_dim,
                      float(beta_now), int(epochs_done), int(planned), best, last, status.get("state", "unknown"),
                      status.get("message", ""), float(raw.get("created") or created), raw.get("parent"),
                      owner=raw.get("owner"), host=status.get("host"), beta_start=cfg.train.beta,
                      sweep=raw["sweep"]["id"] if isinstance(raw.get("sweep"), dict) else None)


def list_runs(runs_dir: Path | None = None) -> list[RunSummary]:
    """Every run under runs_dir, newest first; hidden folders (imports and deletions under way) are not runs."""
    runs_dir = Path(runs_dir or default_runs_dir())
    if not runs_dir.is_dir():
        return []
    out = []
    for p in runs_dir.iterdir():
        if p.name.startswith("."):
            continue
        try:
            if p.is_dir() and (p / CONFIG).exists():
                out.append(summarize_run(p))
            elif p.is_symlink() and link_problem(p) is not None:  # a link to nowhere is still listed, to delete it
                out.append(_unreadable_summary(p, f"the folder {link_problem(p)}; it can be renamed or deleted "
                                                  "(the link only)", 0.0))
        except OSError:
            continue
    return sorted(out, key=lambda r: r.created, reverse=True)


def training_reason(run_dir: Path) -> str | None:
    """Why a run counts as training (its status is active, or a live process holds its lock); None if not."""
    st = read_status(run_dir)
    if st.get("state") in ACTIVE_STATES:
        return f"it is {st['state']}"
    holder = lock_holder(run_dir)
    if holder is not None:
        return f"process {holder.get('pid')} on {holder.get('host')} holds its lock"
    return None


def _is_training(run_dir: Path) -> bool:
    return training_reason(run_dir) is not None


def delete_run(runs_dir: Path, name: str) -> None:
    """Remove a run directory and everything in it; a run that is training (here or in another live process)
    is refused. A run folder that is a link loses the link only, never what it points to.

    The folder is first renamed to a hidden name (it leaves the listing at once, whole), then removed.
    """
    path = resolve_run(Path(runs_dir), name)
    if path.is_symlink():
        path.unlink()
        return
    if not (path / CONFIG).exists():
        raise RunFileError(f"no run named {name!r} in {runs_dir}")
    if _is_training(path):
        raise RunFileError(f"run {name!r} is training; stop it before deleting it")
    trash = path.parent / f".deleting-{path.name}-{secrets.token_hex(4)}"
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
    if trash.exists():
        raise RunFileError(f"run {name!r} is gone from the list, but some of its files could not be removed "
                           f"(they are in {trash.name})")


def rename_run(runs_dir: Path, name: str, new_name: str) -> Path:
    """Rename a run (the new name is sanitised and must be free); a training run is refused.

    A run folder that is a link is renamed as a link (what it points to stays where it is).
    """
    src = resolve_run(Path(runs_dir), name)
    dst = resolve_run(Path(runs_dir), new_name)
    if not (src.is_symlink() or (src / CONFIG).exists()):
        raise RunFileError(f"no run named {name!r} in {runs_dir}")
    if dst.exists() or dst.is_symlink():
        raise ConfigError(f"a run named {dst.name!r} already exists")
    if not src.is_symlink() and _is_training(src):
        raise RunFileError(f"run {name!r} is training; stop it before renaming it")
    src.rename(dst)
    return dst


def clean_leftovers(runs_dir: Path, min_age_s: float = 3600.0) -> None:
    """Remove hidden folders an interrupted import or delete left in runs_dir (at least `min_age_s` old)."""
    now = time.time()
    try:
        entries = list(os.scandir(runs_dir))
    except OSError:
        return
    for e in entries:
        if e.name.startswith((".import-", ".deleting-")):
            try:
                if e.is_dir(follow_symlinks=False) and now - e.stat(follow_symlinks=False).st_mtime >= min_age_s:
                    shutil.rmtree(e.path, ignore_errors=True)
            except OSError:
                continue


def metrics_csv(rows: list[dict[str, Any]]) -> str:
    """Metric rows as CSV (list-valued columns such as kl_per_dim are written as JSON)."""
    import csv
    import io

    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return buf.getvalue()
