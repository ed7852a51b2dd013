"""Runs other tools can read: TensorBoard event files, an MLflow run, and the weights as safetensors.

- TensorBoard: every number of every metrics.jsonl row becomes a scalar at the row's step (tag
  `split/key`; wall_time is the event's time, not a scalar), a list with one value per IWAE k
  becomes one scalar per k (`evidence/iwae/k1000`), a per-dimension list one scalar per latent
  dimension (`test/kl_per_dim/03`), a per-example list (`*_each`) a histogram; reconstructions and
  prior samples are images. `export_tensorboard` writes a finished run from its files (images from
  its checkpoint); `TensorBoardListener` writes a run while it trains.
- MLflow: the config as params, the same scalars as metrics (with their steps and times), the run's
  files (checkpoint included) as artifacts, to any tracking URI (a local ./mlruns by default).
- safetensors: vae_core.model_files (model.safetensors + model.json beside every checkpoint).

The packages are the optional extra `interop`; a missing one is one line saying how to install it.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import runs
from .config import RunConfig
from .images import tile, upscale

INSTALL = 'pip install -e ".[interop]"'
DEFAULT_MLFLOW_URI = "./mlruns"
DEFAULT_EXPERIMENT = "vae-dashboard"
IMAGE_SCALE = 2  # 28-pixel images are tiny in TensorBoard's image panel


class MissingPackage(RuntimeError):
    """An optional package of the `interop` extra is not installed; the message says how to install it."""


def require(module: str, what: str) -> Any:
    """Import `module` or raise MissingPackage with the one line that says how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        if module == "torch.utils.tensorboard":
            package = "tensorboard"
        raise MissingPackage(f"{what} needs the {package} package: {INSTALL}") from None


# ------------------------------------------------------------------ rows -> scalars, histograms, images

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalar_items(row: dict[str, Any]) -> list[tuple[str, float]]:
    """(tag, value) for every number of a metrics row, as TensorBoard and MLflow receive them."""
    split = str(row.get("split", "row"))
    ks = row.get("ks") if isinstance(row.get("ks"), list) else None
    out: list[tuple[str, float]] = []
    for key, value in row.items():
        if key in ("step", "split", "wall_time", "ks"):
            continue
        if _is_number(value):
            out.append((f"{split}/{key}", float(value)))
        elif isinstance(value, list) and value and all(_is_number(v) for v in value) and not key.endswith("_each"):
            if ks is not None and len(value) == len(ks):  # one value per number of importance samples
                out.extend((f"{split}/{key}/k{k}", float(v)) for k, v in zip(ks, value))
            else:  # one value per latent dimension
                width = len(str(len(value) - 1))
                out.extend((f"{split}/{key}/{i:0{width}d}", float(v)) for i, v in enumerate(value))
    return out


def histogram_items(row: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """(tag, values) for the per-example lists of a row (`iwae_each`, `elbo_each`, ...), finite values only."""
    split = str(row.get("split", "row"))
    out = []
    for key, value in row.items():
        if key.endswith("_each") and isinstance(value, list) and all(_is_number(v) for v in value):
            arr = np.asarray(value, dtype=np.float64)
            arr = arr[np.isfinite(arr)]
            if arr.size:
                out.append((f"{split}/{key}", arr))
    return out


def image_items(art: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """(tag, (H, W) uint8 mosaic): originals over their reconstructions, and the prior samples."""
    out = []
    if isinstance(art.get("originals"), np.ndarray) and isinstance(art.get("reconstructions"), np.ndarray):
        pairs = np.concatenate([art["originals"], art["reconstructions"]])
        out.append(("images/reconstructions", upscale(tile(pairs, ncols=len(art["originals"])), IMAGE_SCALE)))
    if isinstance(art.get("samples"), np.ndarray):
        n = len(art["samples"])
        out.append(("images/prior_samples", upscale(tile(art["samples"], ncols=max(1, math.isqrt(n))), IMAGE_SCALE)))
    return out


# ------------------------------------------------------------------ TensorBoard

class _EventWriter:
    """A SummaryWriter that takes metrics rows and image dicts."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        tb = require("torch.utils.tensorboard", "TensorBoard export")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = tb.SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=10)
        self.log_dir = log_dir

    def row(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        wall = float(row["wall_time"]) if _is_number(row.get("wall_time")) else None
        for tag, value in scalar_items(row):
            self.writer.add_scalar(tag, value, step, walltime=wall)
        for tag, values in histogram_items(row):
            self.writer.add_histogram(tag, values, step, walltime=wall)

    def images(self, art: dict[str, Any], step: int) -> None:
        for tag, img in image_items(art):
            self.writer.add_image(tag, img, step, dataformats="HW")

    def close(self) -> None:
        self.writer.close()


def _clear_events(log_dir: Path) -> None:
    """Remove earlier event files (only those) so the folder holds exactly one export."""
    if log_dir.is_dir():
        for p in log_dir.glob("events.out.tfevents.*"):
            p.unlink()


def render_checkpoint_images(run_dir: Path, *, data_dir: str | None = None, data: Any = None) -> dict[str, Any]:
    """Reconstructions and prior samples (uint8) from the run's checkpoint, as the dashboard draws them."""
    from .inference import Weights

    ckpt = runs.load_checkpoint(Path(run_dir) / runs.CHECKPOINT)
    config = RunConfig.from_dict(ckpt["config"])
    w = Weights(config, data_dir=data_dir, data=data)
    w.publish(ckpt["model"], int(ckpt["step"]))
    return w.render_artifacts()


def export_tensorboard(run_dir: Path, out_dir: Path, *, data_dir: str | None = None, data: Any = None) -> Path:
    """Write run_dir's curves (metrics.jsonl) and images (from its checkpoint) to out_dir/<run name>/."""
    run_dir = Path(run_dir)
    runs.read_config(run_dir)  # a folder that is no run fails here, in one line
    rows = runs.read_metrics(run_dir)
    art = render_checkpoint_images(run_dir, data_dir=data_dir, data=data)
    log_dir = Path(out_dir) / run_dir.name
    _clear_events(log_dir)
    step = int(art["step"])
    w = _EventWriter(log_dir)
    try:
        # Steps only grow within the file: an event at a smaller step than the one before reads, to
        # TensorBoard, as a restart and hides the later ones. So the images go in among the rows.
        for row in rows:
            if row["step"] <= step:
                w.row(row)
        w.images(art, step)
        if art.get("missing"):
            w.writer.add_text("images/note", f"no reconstructions: {art['missing']}", step)
        for row in rows:
            if row["step"] > step:
                w.row(row)
    finally:
        w.close()
    return log_dir


class TensorBoardListener:
    """Writes a run's rows (and its images at each test row) to out_dir/<run name>/ as it trains.

    Rows are taken from the run by index, so those logged before the listener was attached are
    written too, none twice. A resumed run rewrites its history (purge_step=0 hides the earlier
    events), so TensorBoard shows one curve. The training thread closes it as it ends; close() again
    (it is idempotent) for a run that may have ended before the listener was attached.
    """

    def __init__(self, run: Any, out_dir: Path) -> None:
        self.run = run
        self._lock = threading.Lock()
        self._written = 0
        self._imaged: set[int] = set()
        self._last_step = -1  # steps only grow in an event file (a smaller one reads as a restart)
        self._closed = False
        self.log_dir = Path(out_dir) / run.name
        self._w = _EventWriter(self.log_dir, purge_step=0)
        run.add_listener(self._on_row)
        getattr(run, "trainer", run).add_exit_listener(lambda _t: self._guarded(self.close))  # a Lab's run or a Trainer
        self._catch_up()

    def _on_row(self, _row: dict[str, Any]) -> None:
        self._guarded(self._catch_up)

    def _guarded(self, fn: Any) -> None:
        """In the training thread: a failing event write (a full disk) ends TensorBoard output, never the run."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - anything; the run's own files are what matter
            with self._lock:
                if self._closed:
                    return
                self._closed = True
            print(f"note: TensorBoard events stopped: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)

    def _catch_up(self) -> None:
        with self._lock:
            if self._closed:
                return
            rows = self.run.metrics(self._written)
            self._written += len(rows)
            for row in rows:
                self._w.row(row)
                self._last_step = max(self._last_step, int(row["step"]))
                if row.get("split") == "test":
                    self._images_locked(int(row["step"]))

    def _images_locked(self, step: int) -> None:
        art = self.run.artifacts()  # the trainer publishes them just before it logs a test row
        if art.get("step") == step and step not in self._imaged and step >= self._last_step:
            self._imaged.add(step)
            self._w.images(art, step)

    def close(self) -> None:
        self._catch_up()
        with self._lock:
            if self._closed:
                return
            art = self.run.artifacts()
            if isinstance(art.get("step"), int):
                self._images_locked(art["step"])
            self._closed = True
            self._w.close()


# ------------------------------------------------------------------ MLflow

def _flat(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def tracking_uri(uri: str | None) -> str:
    """A URI as given (http://, file:, databricks, ...); a plain path becomes a file: URI."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI
    if "://" in uri or uri.startswith("file:") or uri in ("databricks",):
        return uri
    return Path(uri).resolve().as_uri()


def export_mlflow(run_dir: Path, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> tuple[str, str]:
    """Log run_dir as a new MLflow run: config as params, metrics with their steps, run files as artifacts.

    Returns (MLflow run id, tracking URI). MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE
    is set, and mlflow-skinny has no SQL store: for a local folder this process sets it.
    """
    require("mlflow", "MLflow export")
    run_dir = Path(run_dir)
    config = runs.read_json(run_dir / runs.CONFIG)
    runs.read_config(run_dir)  # refuse a folder that is no run
    rows = runs.read_metrics(run_dir)
    uri = tracking_uri(uri)
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    versions = config.pop("versions", {}) if isinstance(config.get("versions"), dict) else {}
    tags = {"vae_dashboard.run": run_dir.name, "vae_dashboard.source": str(run_dir.resolve()),
            **{f"versions.{k}": str(v) for k, v in versions.items()}}
    mrun = client.create_run(exp_id, run_name=run_dir.name, tags=tags)
    rid = mrun.info.run_id
    try:
        params = [Param(k, "" if v is None else str(v)[:6000]) for k, v in _flat(config)]
        for i in range(0, len(params), 100):
            client.log_batch(rid, params=params[i:i + 100])
        metrics = []
        for row in rows:
            ts = int(1000 * row["wall_time"]) if _is_number(row.get("wall_time")) else int(time.time() * 1000)
            metrics.extend(Metric(tag, value, ts, int(row["step"])) for tag, value in scalar_items(row))
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i:i + 1000])
        client.log_batch(rid, tags=[RunTag("vae_dashboard.rows", str(len(rows)))])
        from .model_files import MODEL_JSON, SAFETENSORS

        for name in (runs.CONFIG, runs.METRICS, runs.STATUS, runs.CHECKPOINT, MODEL_JSON, SAFETENSORS):
            if (run_dir / name).is_file():
                client.log_artifact(rid, str(run_dir / name), artifact_path="run")
    except BaseException:
        client.set_terminated(rid, status="FAILED")
        raise
    client.set_terminated(rid, status="FINISHED")
    return rid, uri


# ------------------------------------------------------------------ for the CLI

def check_packages(tensorboard: bool = False, mlflow: bool = False, safetensors: bool = False) -> None:
    """Raise MissingPackage before any work when an asked-for export cannot run."""
    if tensorboard:
        require("torch.utils.tensorboard", "TensorBoard export")
    if mlflow:
        require("mlflow", "MLflow export")
    if safetensors:
        require("safetensors", "safetensors export")

