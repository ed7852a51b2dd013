"""Driving a sweep: `python -m vae_core sweep`, with a local pool of train processes or Ray Tune.

Both executors call sweep.run_point for each grid point that has not finished, so a resumed sweep
trains only the missing runs, and a cancel request (cancel.json, written by anyone who can reach the
runs folder) reaches every run. The driver keeps a heartbeat in sweep.json, so a sweep whose driver
died reads as interrupted. Ray is optional: without it `--executor ray` says how to install it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from . import runs, sweep
from .config import ARCHS, DATASETS, DEVICES, LIKELIHOODS, ConfigError, RunConfig
from .sweep import SweepError

RAY_HINT = 'Ray is not installed; install it with: pip install -e ".[cluster]"'
EXECUTORS = ("local", "ray")


def local_workers(cpus_per_run: float = 1.0) -> int:
    """Runs at once on this machine: one per `cpus_per_run` cores (on 2 cores, two 1-core runs)."""
    return max(1, int((os.cpu_count() or 1) // max(1.0, cpus_per_run)))


class _Heartbeat:
    """The driver's identity and heartbeat in sweep.json, rewritten every runs.HEARTBEAT_S."""

    def __init__(self, runs_dir: Path, sweep_id: str) -> None:
        self.runs_dir, self.sweep_id = runs_dir, sweep_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="vae-sweep-heartbeat", daemon=True)

    def _write(self, **changes: Any) -> None:
        sweep.update_manifest(self.runs_dir, self.sweep_id, driver={**runs.my_identity(), "heartbeat": time.time()},
                              **changes)

    def _beat(self) -> None:
        while not self._stop.wait(runs.HEARTBEAT_S):
            try:
                self._write()
            except OSError:
                pass

    def __enter__(self) -> "_Heartbeat":
        self._write(state="running", message="training its runs")
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_sweep(runs_dir: Path, sweep_id: str, *, executor: str = "local", address: str | None = None,
              workers: int | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0, retries: int = 1,
              data_dir: str | None = None, say: Callable[[str], None] = lambda _m: None) -> dict[str, str]:
    """Train every unfinished point of the sweep; returns {run name: finished | cancelled | failed}."""
    runs_dir = Path(runs_dir)
    raw, base, grid = sweep.load_sweep(runs_dir, sweep_id)
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")
    if executor == "ray":
        _import_ray()  # before anything is written: one line saying how to install it
    if "driver" in raw:  # a sweep that ran before (cancelled, interrupted) runs again; a cancel that came before
        sweep.clear_cancel(runs_dir, sweep_id)  # its first driver started (the page's Cancel at once) still holds
    owner = raw.get("owner") if isinstance(raw.get("owner"), str) else None
    threads = max(1, int(cpus_per_run)) if cpus_per_run >= 1 else 1
    todo = [p for p in grid.points(sweep_id) if not sweep.point_finished(runs_dir, p.name)]
    jobs = [sweep.job(runs_dir, sweep_id, p, base, grid, owner=owner, threads=threads, data_dir=data_dir)
            for p in todo]
    n_all = len(grid.points(sweep_id))
    say(f"sweep {sweep_id}: {len(jobs)} of {n_all} runs to train ({executor} executor)")
    with _Heartbeat(runs_dir, sweep_id) as beat:
        try:
            if executor == "local":
                results = _run_local(jobs, workers or local_workers(cpus_per_run), retries, say)
            else:
                results = _run_ray(jobs, runs_dir, sweep_id, address, cpus_per_run, gpus_per_run, retries, say)
        except BaseException:
            beat._write(state="failed", message="the driver stopped with an error")
            raise
        done = {p.name for p in grid.points(sweep_id) if sweep.point_finished(runs_dir, p.name)}
        failed = sorted(n for n, s in results.items() if s == "failed")
        if sweep.cancel_requested(runs_dir, sweep_id):
            state, msg = "cancelled", f"cancelled with {len(done)} of {n_all} runs finished"
        elif failed:
            state, msg = "failed", f"{len(failed)} run(s) failed: {', '.join(failed[:3])}"
        else:
            state, msg = ("finished", f"all {n_all} runs finished") if len(done) == n_all else \
                ("interrupted", f"{len(done)} of {n_all} runs finished")
        beat._write(state=state, message=msg)
    say(f"sweep {sweep_id}: {msg}")
    return results


def _run_local(jobs: list[dict[str, Any]], workers: int, retries: int,
               say: Callable[[str], None]) -> dict[str, str]:
    """A pool of `workers` threads, each watching one train process at a time (no new dependency)."""
    def one(j: dict[str, Any]) -> str:
        for attempt in range(retries + 1):
            try:
                result = sweep.run_point(j)
            except SweepError as e:
                say(f"{e}" + (f"; retrying ({attempt + 1} of {retries})" if attempt < retries else ""))
                continue
            say(f"{j['name']}: {result['state']}" + (f", test ELBO {result['test_elbo']:.2f}"
                                                     if "test_elbo" in result else ""))
            return result["state"]
        return "failed"

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vae-sweep") as pool:
        futures = {j["name"]: pool.submit(one, j) for j in jobs}
        return {name: f.result() for name, f in futures.items()}


def _import_ray() -> Any:
    import importlib

    try:
        ray = importlib.import_module("ray")
        importlib.import_module("ray.tune")
    except ImportError:
        raise SweepError(RAY_HINT) from None
    return ray


def _trial(config: dict[str, Any]) -> None:
    """One Ray Tune trial: one grid point. A failed run raises, so Tune retries it (FailureConfig)."""
    from ray import tune

    result = sweep.run_point(config["job"])
    tune.report({k: v for k, v in result.items() if k != "name"})


def _run_ray(jobs: list[dict[str, Any]], runs_dir: Path, sweep_id: str, address: str | None, cpus: float,
             gpus: float, retries: int, say: Callable[[str], None]) -> dict[str, str]:
    """The points as Ray Tune trials (a grid search over jobs), each with its own CPU and GPU share."""
    ray = _import_ray()
    from ray import tune

    if not jobs:
        return {}
    started_here = False
    if not ray.is_initialized():
        # Workers import this same vae_core (a source checkout need not be installed on the cluster's nodes
        # when they share its folder); on other machines an installed package wins if the folder is absent.
        env = {"PYTHONPATH": os.pathsep.join(p for p in (sweep.source_root(),
                                                          os.environ.get("PYTHONPATH")) if p)}
        ray.init(address=None if address in (None, "", "local") else address, runtime_env={"env_vars": env},
                 include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=False)
        started_here = True
    storage = (sweep.sweep_dir(runs_dir, sweep_id) / "ray").resolve()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's tables: the driver says one line per run itself
    try:
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"cpu": cpus, "gpu": gpus}),
            param_space={"job": tune.grid_search(jobs)},
            tune_config=tune.TuneConfig(trial_dirname_creator=lambda t: t.trial_id,
                                        trial_name_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=f"tune-{int(time.time())}", storage_path=str(storage), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=retries)))
        grid = tuner.fit()
        out = {}
        for result in grid:
            name = result.config["job"]["name"]
            out[name] = "failed" if result.error is not None else str(result.metrics.get("state", "failed"))
            say(f"{name}: {out[name]}")
        return out
    finally:
        if started_here:
            ray.shutdown()


# ------------------------------------------------------------------ the command line

def add_parser(sub: Any) -> None:
    """`python -m vae_core sweep`: the subcommand's options (cli.py adds it)."""
    d = RunConfig()
    s = sub.add_parser("sweep", help="train a grid of β × latent size (× seeds) as one sweep, here or on Ray")
    s.add_argument("--beta", default=None, help="comma-separated β values, e.g. 0.25,1,4 (default: --beta of "
                                                f"the base settings, {d.train.beta:g})")
    s.add_argument("--latent-dim", default=None, help=f"comma-separated latent sizes, e.g. 2,8,32 (default "
                                                      f"{d.model.latent_dim})")
    s.add_argument("--seeds", type=int, default=1, help="runs per grid point, with seeds --seed, --seed+1, ...")
    s.add_argument("--name", default=None, help="the sweep's id (default sweep-<time>); runs are named after it")
    s.add_argument("--resume", default=None, metavar="SWEEP", help="train the unfinished runs of this sweep")
    s.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="local (default): a pool of train processes on this machine; ray: Ray Tune trials on a "
                        "cluster. --resume keeps the sweep's executor and resources unless given again")
    s.add_argument("--address", default=None, help="Ray cluster: auto or HOST:PORT (default: a local Ray)")
    s.add_argument("--workers", type=int, default=None, help="local: runs at once (default: cores / --cpus-per-run)")
    s.add_argument("--cpus-per-run", type=float, default=None, help="CPU cores (torch threads) per run, default 1")
    s.add_argument("--gpus-per-run", type=float, default=None, help="ray: GPU share per run, e.g. 0.25 packs four")
    s.add_argument("--retries", type=int, default=1, help="attempts after a run fails (it resumes), default 1")
    s.add_argument("--runs-dir", default=None, help="where runs live (default ./runs or VAE_RUNS_DIR); shared "
                                                    "storage on a multi-node cluster")
    s.add_argument("--data-dir", default=None)
    for flag, kind, choices in (("--dataset", str, DATASETS), ("--arch", str, ARCHS), ("--hidden-dim", int, None),
                                ("--epochs", int, None), ("--batch-size", int, None), ("--lr", float, None),
                                ("--warmup-epochs", float, None), ("--free-bits", float, None),
                                ("--likelihood", str, LIKELIHOODS), ("--device", str, DEVICES), ("--seed", int, None),
                                ("--train-size", int, None), ("--evidence-every", int, None)):
        s.add_argument(flag, type=kind, choices=choices, default=None, help="as for train")
    s.add_argument("--no-binarize", action="store_true", help="as for train")
    s.add_argument("--quiet", action="store_true", help="only the last line")


_BASE = ("dataset", "arch", "hidden_dim", "epochs", "batch_size", "lr", "warmup_epochs", "free_bits", "likelihood",
         "device", "seed", "train_size", "evidence_every")


def cmd_sweep(args: argparse.Namespace) -> int:
    runs_dir = Path(args.runs_dir) if args.runs_dir else runs.default_runs_dir()
    kept: dict[str, Any] = {}
    if args.resume:  # what the sweep was started with, where this command does not say otherwise
        raw = sweep.load_sweep(runs_dir, args.resume)[0]
        kept = raw.get("options") if isinstance(raw.get("options"), dict) else {}
    for name, default in (("executor", "local"), ("address", None), ("cpus_per_run", 1.0), ("gpus_per_run", 0.0)):
        if getattr(args, name) is None:
            setattr(args, name, kept.get(name, default))
    if args.executor not in EXECUTORS or not all(isinstance(getattr(args, n), (int, float)) and
                                                 not isinstance(getattr(args, n), bool)
                                                 for n in ("cpus_per_run", "gpus_per_run")):
        raise ConfigError("the sweep's recorded executor options are not usable; give --executor and its options")
    for name in ("workers", "retries"):
        v = getattr(args, name)
        if v is not None and v < (1 if name == "workers" else 0):
            raise ConfigError(f"--{name} must be at least {1 if name == 'workers' else 0}")
    if not (0 < args.cpus_per_run <= 1024 and 0 <= args.gpus_per_run <= 64):
        raise ConfigError("--cpus-per-run must be above 0 and --gpus-per-run at least 0")
    if args.executor == "ray":
        try:
            _import_ray()
        except SweepError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.resume:
        sweep_id = args.resume
        sweep.load_sweep(runs_dir, sweep_id)
    else:
        changes = {f: getattr(args, f) for f in _BASE if getattr(args, f) is not None}
        if args.no_binarize:
            changes["binarize"] = False
        if "dataset" not in changes:
            from .sources import default_dataset

            changes["dataset"] = default_dataset(args.data_dir)
        base = RunConfig().replace(**changes)
        grid = sweep.make_grid(args.beta or f"{base.train.beta:g}", args.latent_dim or str(base.model.latent_dim),
                               args.seeds, first_seed=base.train.seed)
        options = {"executor": args.executor, "address": args.address, "cpus_per_run": args.cpus_per_run,
                   "gpus_per_run": args.gpus_per_run}
        sweep_id = sweep.create_sweep(runs_dir, base, grid, sweep_id=args.name, options=options)["id"]
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    stop = _CancelOnSignal(runs_dir, sweep_id)
    try:
        results = run_sweep(runs_dir, sweep_id, executor=args.executor, address=args.address, workers=args.workers,
                            cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run, retries=args.retries,
                            data_dir=args.data_dir, say=say)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stop.restore()
    st = sweep.sweep_status(runs_dir, sweep_id)
    print(f"sweep {sweep_id}: {st.state}, {st.count('finished')} of {len(st.points)} runs finished; "
          f"runs in {runs_dir}")
    if st.state != "finished":
        print(f"finish it with: python -m vae_core sweep --resume {sweep_id} --runs-dir {runs_dir}", file=sys.stderr)
    if stop.signum is not None:
        return 128 + stop.signum
    return 0 if all(s == "finished" for s in results.values()) and st.state == "finished" else 1


class _CancelOnSignal:
    """SIGINT/SIGTERM cancel the sweep: its runs stop and checkpoint; --resume finishes them later."""

    def __init__(self, runs_dir: Path, sweep_id: str) -> None:
        self.runs_dir, self.sweep_id, self.signum = runs_dir, sweep_id, None
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    def __call__(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        try:
            sweep.request_cancel(self.runs_dir, self.sweep_id)
        except (OSError, runs.RunFileError):
            pass

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
