"""A time-lapse of learning: small copies of the weights at geometrically spaced steps, within a size budget.

Learning moves fast at first and slowly later, so the schedule is geometric in the steps a run has
trained: its start, then PER_OCTAVE snapshots per doubling (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, ...),
about 30 over the default 1,570-step run, plus the last step whenever training ends. Nothing needs the
run's length in advance; a very long run (or a small budget) thins the kept ones, dropping whichever
leaves the smallest gap in log-steps, so what stays is still spread evenly from start to end.

Each snapshot is snapshots/step-NNNNNNNNN.pt: the model's weights in float16 (half the bytes; the decoded
images differ from float32's by under one grey level of 255, docs/performance.md), written atomically like
the checkpoint and read with weights_only=True after the same size checks. A fork's schedule counts from
its fork point (it copies none of its parent's snapshots: the parent keeps its own history); a resumed
run continues its schedule.
"""
from __future__ import annotations

import collections
import io
import math
import re
import threading
from pathlib import Path
from typing import Any

import torch

from . import runs
from .config import ModelConfig, RunConfig
from .lab import RunHandle
from .records import Status

FOLDER = "snapshots"
VERSION = 1
PER_OCTAVE = 3  # snapshots per doubling of the step count: ratio 2^(1/3) = 1.26 between neighbours
NAME = re.compile(r"^step-(\d{9})\.pt$")
SLACK_BYTES = 64 * 1024  # beyond the tensors: the pickle with names, step, version
MAX_FILES = 1000  # a folder holding more than this is not one this program wrote


def file_name(step: int) -> str:
    return f"step-{int(step):09d}.pt"


def is_due(n: int) -> bool:
    """True when a run that has trained n steps since its start (or fork point) keeps a snapshot there."""
    if n < 0:
        return False
    if n == 0:
        return True
    k = round(PER_OCTAVE * math.log2(n))
    return any(math.floor(2 ** (j / PER_OCTAVE) + 0.5) == n for j in (k - 1, k, k + 1))


def schedule(last: int) -> list[int]:
    """Every step from 0 to `last` (steps since the start) that the schedule keeps, in order."""
    out = [0]
    j = 0
    while True:
        n = math.floor(2 ** (j / PER_OCTAVE) + 0.5)
        if n > last:
            return out
        if n != out[-1]:
            out.append(n)
        j += 1


def thin(steps: list[int], keep: int, origin: int = 0) -> list[int]:
    """The steps to drop so that at most `keep` remain: never the first or the last; each time the one whose
    neighbours are closest in log(1 + steps since origin), so the rest stay evenly spread on that scale."""
    kept = sorted(steps)
    dropped: list[int] = []
    keep = max(keep, 0)
    while len(kept) > keep:
        if len(kept) <= 2:  # a budget below two snapshots: the newest goes last
            dropped.append(kept.pop(0))
            continue
        logs = [math.log1p(max(s - origin, 0)) for s in kept]
        i = min(range(1, len(kept) - 1), key=lambda i: (logs[i + 1] - logs[i - 1], kept[i]))
        dropped.append(kept.pop(i))
    return dropped


def snapshot_bytes(model: ModelConfig) -> int:
    """The most bytes one snapshot of this model may hold: its weights in float16, plus the pickle's slack."""
    return sum(math.prod(shape) * 2 for shape, _ in runs._model_shapes(model).values()) + SLACK_BYTES


def budget_bytes(config: RunConfig) -> int:
    return int(config.train.snapshot_budget_mb * 2**20)


def origin_of(run_dir: Path) -> int:
    """The step a run's schedule counts from: its fork point (config.json's parent.step), else 0."""
    parent = runs.read_json_or_empty(Path(run_dir) / runs.CONFIG).get("parent")
    step = parent.get("step") if isinstance(parent, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else 0


def files(run_dir: Path) -> dict[int, Path]:
    """Step -> file of every snapshot in the run (names this program writes only; links are skipped)."""
    folder = Path(run_dir) / FOLDER
    out: dict[int, Path] = {}
    try:
        entries = sorted(folder.iterdir())[:MAX_FILES]
    except OSError:  # no folder (a run from before time-lapses, or snapshots off)
        return out
    for p in entries:
        m = NAME.match(p.name)
        if m and not p.is_symlink() and p.is_file():
            out[int(m.group(1))] = p
    return out


def list_steps(run_dir: Path) -> list[int]:
    return sorted(files(run_dir))


def total_bytes(run_dir: Path) -> int:
    return sum(p.stat().st_size for p in files(run_dir).values())


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CPU float16 copy of a state dict (other dtypes as they are)."""
    return {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu().clone())
            for k, v in state.items()}


def write(run_dir: Path, step: int, state: dict[str, torch.Tensor]) -> Path:
    """Write one snapshot atomically (temp file + rename) and return its path."""
    folder = Path(run_dir) / FOLDER
    folder.mkdir(exist_ok=True)
    buf = io.BytesIO()
    torch.save({"version": VERSION, "step": int(step), "model": half(state)}, buf)
    path = folder / file_name(step)
    runs.atomic_write_bytes(path, buf.getvalue())
    return path


def enforce_budget(run_dir: Path, budget: int, origin: int = 0) -> list[int]:
    """Delete snapshots (thin()'s choice) until their total is within `budget` bytes; returns the steps dropped."""
    found = files(run_dir)
    sizes = {s: p.stat().st_size for s, p in found.items()}
    total = sum(sizes.values())
    if total <= budget or not sizes:
        return []
    each = max(sizes.values())
    dropped = thin(list(sizes), budget // each, origin)
    for s in dropped:
        found[s].unlink(missing_ok=True)
    return dropped


def load(path: Path, model: ModelConfig) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, float32 state dict) from one snapshot file; RunFileError names what is wrong in one line.

    Checked like the checkpoint: stored entries whose sizes fit the file and this model's float16
    weights, then torch.load(weights_only=True), then every tensor's name, shape and dtype.
    """
    path = Path(path)
    label = f"{FOLDER}/{path.name}"
    try:
        runs._check_checkpoint_zip(path, snapshot_bytes(model))
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except runs.RunFileError as e:
        raise runs.RunFileError(str(e).replace(str(path), label)) from None
    except Exception as e:  # an unsafe pickle, a truncated file
        raise runs.RunFileError(f"{label} cannot be loaded: {runs._one_line(e)}") from None
    if not isinstance(raw, dict) or raw.get("version") != VERSION or not isinstance(raw.get("model"), dict):
        raise runs.RunFileError(f"{label} is not a snapshot written by this program")
    step = raw.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise runs.RunFileError(f"{label} has no valid step")
    want = runs._model_shapes(model)
    state = raw["model"]
    if set(state) != set(want):
        raise runs.RunFileError(f"{label} does not fit the run's model")
    out = {}
    for k, (shape, dtype) in want.items():
        v = state[k]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape or \
                v.dtype != (torch.float16 if dtype.is_floating_point else dtype):
            raise runs.RunFileError(f"{label}: tensor {k} does not fit the run's model")
        out[k] = v.to(dtype)
    return step, out


class Recorder:
    """The training thread's side: takes a snapshot when the schedule says so and keeps the folder in budget."""

    def __init__(self, run_dir: Path, config: RunConfig) -> None:
        self.run_dir = Path(run_dir)
        self.budget = budget_bytes(config)
        self.origin = origin_of(self.run_dir)
        runs.clean_temp_files(self.run_dir / FOLDER)  # what a kill during a snapshot's write left

    @classmethod
    def for_run(cls, run_dir: Path | None, config: RunConfig) -> "Recorder | None":
        """A recorder, or None when the run keeps no snapshots (not persisted, or a budget of 0)."""
        if run_dir is None or config.train.snapshot_budget_mb <= 0:
            return None
        return cls(run_dir, config)

    def due(self, step: int) -> bool:
        return is_due(step - self.origin)

    def take(self, step: int, state: dict[str, torch.Tensor]) -> bool:
        """Snapshot `state` as step `step` unless one exists or a weight is not finite; False when skipped."""
        if (self.run_dir / FOLDER / file_name(step)).exists():
            return False
        if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
            return False  # a blown-up step: the time-lapse shows only weights the run kept
        write(self.run_dir, step, state)
        enforce_budget(self.run_dir, self.budget, self.origin)
        return True


_VIEWS: collections.OrderedDict[tuple[Any, ...], "SnapshotRun"] = collections.OrderedDict()
_VIEWS_LOCK = threading.Lock()
MAX_VIEWS = 12  # views kept in memory (~2.5 MB of float32 weights each for the default model): a slider's span


def open_view(parent: RunHandle, step: int) -> "SnapshotRun":
    """The run `parent` as it was at snapshot `step`; RunFileError when there is none or it is unreadable.

    Views are kept by (run, step, file version), so scrubbing back and forth reloads nothing.
    """
    step = int(step)
    path = files(parent.run_dir).get(step)
    version = runs.file_version(path) if path is not None else None
    if path is None or version is None:
        raise runs.RunFileError(f"run {parent.name!r} has no snapshot at step {step:,}")
    key = (str(Path(parent.run_dir).resolve()), parent.token, step, version)
    with _VIEWS_LOCK:
        view = _VIEWS.get(key)
        if view is not None:
            _VIEWS.move_to_end(key)
            return view
    got, state = load(path, parent.config.model)
    if got != step:
        raise runs.RunFileError(f"{FOLDER}/{path.name} says it holds step {got}")
    view = SnapshotRun(parent, step, state)
    with _VIEWS_LOCK:
        _VIEWS[key] = view
        while len(_VIEWS) > MAX_VIEWS:
            _VIEWS.popitem(last=False)
    return view


class SnapshotRun(RunHandle):
    """A read-only view of a run as it was at one snapshot: every RunHandle call a panel draws with
    (decode, encode, test_set, artifacts, ...) answered from the snapshot's weights on the CPU."""

    def __init__(self, parent: RunHandle, step: int, state: dict[str, torch.Tensor]) -> None:
        from .inference import Weights

        self.parent, self.name, self.run_dir = parent, parent.name, parent.run_dir
        self.weights = Weights(parent.config, data_dir=parent.weights.data_dir)
        self.weights.dataset = parent.weights.dataset  # the run's own images, loaded once for both
        self.weights.publish(state, step)

    def status(self) -> Status:
        return self.parent.status()

    def metrics(self, since: int = 0) -> list[dict[str, Any]]:
        return self.parent.metrics(since)

    def metrics_count(self) -> int:
        return self.parent.metrics_count()

    def artifacts(self) -> dict[str, Any]:
        """Prior samples (the Training tab's fixed z), test originals and their reconstructions, as uint8."""
        return self.weights.render_artifacts()
