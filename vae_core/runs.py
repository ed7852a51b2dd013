"""Run directories on disk: config.json, metrics.jsonl, checkpoint.pt, status.json.

Everything is written so that a SIGKILL at any moment leaves a run that loads:
config, status and checkpoint are replaced atomically (temp file + rename), and
metrics are appended a line at a time and flushed.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig

CHECKPOINT_VERSION = 1
CONFIG, METRICS, CHECKPOINT, STATUS = "config.json", "metrics.jsonl", "checkpoint.pt", "status.json"
CONTROL, LOCK = "control.json", "train.lock"  # steering written by any process; held by the one that trains
HOST = socket.gethostname()
# The training process rewrites status.json at least this often (a heartbeat thread, not the loop, so a
# long evaluation does not stop it). A run whose heartbeat is older than STALE_S reads as interrupted:
# the only test that works across machines; on this host a dead PID says so at once.
HEARTBEAT_S = 2.0
STALE_S = 30.0
ACTIVE_STATES = ("running", "paused", "queued")
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
    return f"{t.dataset}-z{config.model.latent_dim}-b{t.beta:g}-{stamp}"


def resolve_run(runs_dir: Path, name: str) -> Path:
    """The directory of a run by name, refusing anything that would leave runs_dir."""
    path = (runs_dir / sanitize_name(name)).resolve()
    if path.parent != runs_dir.resolve():
        raise ConfigError(f"run name {name!r} would leave the runs directory")
    return path


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_config(run_dir: Path, config: RunConfig, **extra: Any) -> None:
    atomic_write_json(Path(run_dir) / CONFIG, {**config.to_dict(), **extra, "versions": library_versions()})


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFileError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RunFileError(f"{path} must hold a JSON object")
    return obj


def read_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG
    d = read_json(path)
    try:
        return RunConfig.from_dict({"model": d.get("model", {}), "train": d.get("train", {})})
    except ConfigError as e:
        raise RunFileError(f"{path}: {e}") from None


def write_status(run_dir: Path, state: str, message: str = "", **extra: Any) -> None:
    """status.json with who writes it (host, pid) and when (heartbeat, seconds since the epoch)."""
    now = time.time()
    atomic_write_json(Path(run_dir) / STATUS, {"state": state, "message": message, "pid": os.getpid(), "host": HOST,
                                               "heartbeat": now, "updated": dt.datetime.now().isoformat(timespec="seconds"),
                                               **extra})


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_gone(st: dict[str, Any], now: float | None = None) -> bool:
    """Whether the process that wrote this status has ended: its PID is gone (this host) or its heartbeat is stale."""
    host, pid = st.get("host"), int(st.get("pid", -1) or -1)
    if host in (None, HOST) and not _pid_alive(pid):
        return True
    beat = st.get("heartbeat")
    if not isinstance(beat, (int, float)):
        return host not in (None, HOST)  # an old-format status from elsewhere: nothing says it lives
    return (now or time.time()) - beat > STALE_S


def read_status(run_dir: Path) -> dict[str, Any]:
    """status.json; an active run whose writing process has ended (writer_gone) reads as 'interrupted'."""
    try:
        st = read_json(Path(run_dir) / STATUS)
    except RunFileError:
        return {"state": "unknown", "message": "no readable status.json"}
    if st.get("state") in ACTIVE_STATES and writer_gone(st):
        where = f" on {st.get('host')}" if st.get("host") not in (None, HOST) else ""
        st = {**st, "state": "interrupted",
              "message": f"the process training it{where} ended; resume from the last checkpoint"}
    return st


# ------------------------------------------------------------------ steering and the training lock

def read_control(run_dir: Path) -> dict[str, Any]:
    """control.json ({} if there is none or it is unreadable): live settings and a command, with a sequence number."""
    try:
        return read_json(Path(run_dir) / CONTROL)
    except RunFileError:
        return {}


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
        seq = int(ctl.get("seq", 0)) + 1
        ctl.update({k: float(v) for k, v in live.items()})
        ctl.update({"seq": seq, "command": command, "written": time.time(), "by": f"{HOST}:{os.getpid()}"})
        atomic_write_json(run_dir / CONTROL, ctl)
    return seq


class RunBusy(RunFileError):
    """Another live process trains this run; the message says which."""


class RunLock:
    """train.lock: at most one process trains a run. A lock whose process has ended (writer_gone) is taken over."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self) -> "RunLock":
        me = {"host": HOST, "pid": os.getpid(), "heartbeat": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == HOST and holder.get("pid") == os.getpid():
                    raise RunBusy(f"run {self.path.parent.name!r} is already training in this process")
                # The holder's liveness: its PID on this host, else the heartbeat of the run's status.
                st = {**holder, "heartbeat": read_status_raw(self.path.parent).get("heartbeat", holder.get("heartbeat"))}
                if holder and not writer_gone(st):
                    raise RunBusy(f"run {self.path.parent.name!r} is being trained by process {holder.get('pid')} "
                                  f"on {holder.get('host')}; stop it there first")
                self.path.unlink(missing_ok=True)  # stale: its process ended without releasing it
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunBusy(f"could not take {self.path}; another process keeps creating it")

    def _holder(self) -> dict[str, Any]:
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder.get("pid") == os.getpid() and holder.get("host") == HOST:
                self.path.unlink(missing_ok=True)
            self.held = False


def file_version(path: Path) -> tuple[int, int] | None:
    """(mtime in ns, size) of a file, None when it is missing: what readers compare to see that it changed."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except RunFileError:
        return {}


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


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All metric rows; a corrupt line (e.g. half-written at a crash) is skipped with a warning."""
    path = Path(run_dir) / METRICS
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError:
                warnings.warn(f"{path}: skipped corrupt line {i}", RuntimeWarning, stacklevel=2)
                continue
            rows.append(row)
    return rows


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only rows up to `step` (what a checkpoint covers), rewriting the file atomically."""
    kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= step]
    atomic_write_bytes(Path(run_dir) / METRICS, "".join(json.dumps(m) + "\n" for m in kept).encode())


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write checkpoint.pt atomically. state holds only tensors, numbers, strings, lists and dicts."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buf)
    atomic_write_bytes(Path(run_dir) / CHECKPOINT, buf.getvalue())


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
    error: str | None = None
    owner: str | None = None  # the dashboard session that started it (None: the CLI or an older run)
    host: str | None = None
    beta_start: float | None = None  # config.json's β; `beta` is the one it trains with now (status.json)


def summarize_run(run_dir: Path) -> RunSummary:
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    created = run_dir.stat().st_mtime
    try:
        cfg_raw = read_json(run_dir / CONFIG)
        cfg = read_config(run_dir)
    except RunFileError as e:
        return RunSummary(run_dir.name, str(run_dir), "?", "?", 0, float("nan"), 0, 0, None, None,
                          "corrupt", str(e), created, None, error=str(e))
    tests = [r for r in read_metrics_tail(run_dir) if r.get("split") == "test"]
    best = max((r["elbo"] for r in tests if isinstance(r.get("elbo"), (int, float))), default=None)
    beta_now = status.get("beta") if isinstance(status.get("beta"), (int, float)) else cfg.train.beta
    return RunSummary(run_dir.name, str(run_dir), cfg.train.dataset, cfg.model.arch, cfg.model.latent_dim,
                      float(beta_now), int(status.get("epochs_done", len(tests))),
                      int(status.get("epochs_target", cfg.train.epochs)), best,
                      tests[-1] if tests else None, status.get("state", "unknown"), status.get("message", ""),
                      float(cfg_raw.get("created", created)), cfg_raw.get("parent"), owner=cfg_raw.get("owner"),
                      host=status.get("host"), beta_start=cfg.train.beta)


def read_metrics_tail(run_dir: Path) -> list[dict[str, Any]]:
    """Only the per-epoch test rows, found without parsing every train row (they are most lines)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if '"split": "test"' in line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def list_runs(runs_dir: Path | None = None) -> list[RunSummary]:
    """Every run under runs_dir, newest first."""
    runs_dir = Path(runs_dir or default_runs_dir())
    if not runs_dir.is_dir():
        return []
    out = [summarize_run(p) for p in runs_dir.iterdir() if p.is_dir() and (p / CONFIG).exists()]
    return sorted(out, key=lambda r: r.created, reverse=True)


def _is_training(run_dir: Path) -> bool:
    st = read_status(run_dir)
    return st.get("state") in ACTIVE_STATES


def delete_run(runs_dir: Path, name: str) -> None:
    """Remove a run directory; a run that is training (here or in another live process) is refused."""
    path = resolve_run(Path(runs_dir), name)
    if not (path / CONFIG).exists():
        raise RunFileError(f"no run named {name!r} in {runs_dir}")
    if _is_training(path):
        raise RunFileError(f"run {name!r} is training; stop it before deleting it")
    for f in path.iterdir():
        if f.is_file():
            f.unlink()
    path.rmdir()


def rename_run(runs_dir: Path, name: str, new_name: str) -> Path:
    """Rename a run (the new name is sanitised and must be free); a training run is refused."""
    src = resolve_run(Path(runs_dir), name)
    dst = resolve_run(Path(runs_dir), new_name)
    if not (src / CONFIG).exists():
        raise RunFileError(f"no run named {name!r} in {runs_dir}")
    if dst.exists():
        raise ConfigError(f"a run named {dst.name!r} already exists")
    if _is_training(src):
        raise RunFileError(f"run {name!r} is training; stop it before renaming it")
    src.rename(dst)
    return dst


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
