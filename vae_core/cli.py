"""`python -m vae_core train|evaluate|runs`: the headless face of the core.

Bad arguments and unusable inputs end with one line on stderr and a non-zero exit,
never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from .config import ARCHS, COLOUR_DATASETS, DATASETS, DEVICES, LIKELIHOODS, LIVE_FIELDS, PRECISIONS, ConfigError, RunConfig, unit_label

EXIT_USAGE, EXIT_FAILED = 2, 1
MAX_GRID = 500  # grid points per axis for `evaluate`: 250,000 decoder passes per example
MAX_EXAMPLES = 10_000  # the largest test set (MNIST)


class CliError(Exception):
    """A one-line, user-facing failure."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message; keep it to one line
        raise CliError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m vae_core", description="Train and evaluate variational autoencoders.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a VAE (or continue one with --resume)")
    d = RunConfig()
    t.add_argument("--dataset", type=_dataset_arg, default=None, metavar="{" + ",".join(DATASETS + COLOUR_DATASETS) + ",folder:PATH}",
                   help="default: mnist, else fashion-mnist, when found on this machine (see --data-dir), else sprites; "
                        "folder:PATH trains on a folder of PNG/JPEG/WebP images (sub-folders are labels)")
    t.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 grey or 3 colour (default: from the data)")
    t.add_argument("--image-size", type=int, default=None,
                   help="resize and centre-crop to this side, 16-128 (default: the data's own size, else 64)")
    t.add_argument("--arch", choices=ARCHS, default=None, help=f"default {d.model.arch}")
    t.add_argument("--latent-dim", type=int, default=None, help=f"default {d.model.latent_dim}")
    t.add_argument("--hidden-dim", type=int, default=None, help=f"default {d.model.hidden_dim}")
    t.add_argument("--beta", type=float, default=None, help=f"weight of the KL term, default {d.train.beta:g}")
    t.add_argument("--epochs", type=int, default=None,
                   help=f"default {d.train.epochs}; with --resume, how many more")
    t.add_argument("--batch-size", type=int, default=None, help=f"default {d.train.batch_size}")
    t.add_argument("--lr", type=float, default=None, help=f"Adam learning rate, default {d.train.lr:g}")
    t.add_argument("--warmup-epochs", type=float, default=None, help="linear KL warm-up length in epochs")
    t.add_argument("--free-bits", type=float, default=None, help="per-dimension KL floor in nats")
    t.add_argument("--likelihood", choices=LIKELIHOODS, default=None, help=f"default {d.model.likelihood}")
    t.add_argument("--no-binarize", action="store_true",
                   help="train on grey levels (Bernoulli numbers are then BCE, not log-likelihoods)")
    t.add_argument("--device", choices=DEVICES, default=None, help="default auto (CUDA, then MPS, then CPU)")
    t.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32 (default) or bf16: mixed precision, faster on CUDA GPUs and on CPUs with AMX")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--train-size", type=int, default=None, help="use only the first N training images")
    t.add_argument("--evidence-every", type=int, default=None,
                   help="epochs between importance-weighted evaluations (0: off)")
    t.add_argument("--snapshot-budget-mb", type=float, default=None,
                   help="disk for the time-lapse's weight snapshots (default 40; 0: none)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    t.add_argument("--data-dir", default=None, help="folder with MNIST/Fashion-MNIST IDX files (or VAE_DATA_DIR)")
    t.add_argument("--runs-dir", default=None, help="where runs live (default ./runs or VAE_RUNS_DIR)")
    t.add_argument("--name", default=None, help="run name (default: dataset-z<latent>-b<beta>-<time>)")
    t.add_argument("--resume", default=None, metavar="RUN", help="continue this run directory (or zip of one)")
    t.add_argument("--fork", default=None, metavar="RUN",
                   help="start a new run from this run's checkpoint (change --beta/--lr/--warmup-epochs/--free-bits)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--tensorboard-dir", default=None, metavar="DIR",
                   help="also write TensorBoard event files (curves, images) to DIR/<run name> as it trains")

    e = sub.add_parser("evaluate", help="test-set ELBO, KL and the importance-weighted bound of a run")
    e.add_argument("run_dir")
    e.add_argument("--iwae-k", type=int, default=100, help="importance samples (1..5000)")
    e.add_argument("--num-examples", type=int, default=500, help="test images to evaluate")
    e.add_argument("--grid", type=int, default=100, help="grid size per axis for 2-latent runs (0: skip)")
    e.add_argument("--grid-examples", type=int, default=None,
                   help="examples whose log p(x) is integrated on the grid (default 16, at most --num-examples)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--metrics", default="elbo", metavar="LIST",
                   help="comma-separated: elbo (the bounds above), mig, dci (sprites: their true factors), "
                        "tc (the β-TCVAE terms of the KL); default elbo")
    e.add_argument("--json", action="store_true")

    r = sub.add_parser("runs", help="list runs, newest first (with who trains them and where)")
    r.add_argument("--runs-dir", default=None)
    r.add_argument("--json", action="store_true")

    x = sub.add_parser("export", help="write runs for other tools: TensorBoard, MLflow, safetensors, zip")
    x.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or names under --runs-dir)")
    x.add_argument("--tensorboard", action="store_true", help="event files of the curves and images")
    x.add_argument("--tensorboard-dir", default="tensorboard", metavar="DIR",
                   help="where: DIR/<run name> (default ./tensorboard; then tensorboard --logdir DIR)")
    x.add_argument("--mlflow", action="store_true", help="a new MLflow run: params, metrics, checkpoint")
    x.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="tracking URI (default MLFLOW_TRACKING_URI, else the local folder ./mlruns)")
    x.add_argument("--mlflow-experiment", default="vae-dashboard", metavar="NAME")
    x.add_argument("--safetensors", action="store_true",
                   help="model.safetensors + model.json from the checkpoint (new checkpoints write them anyway)")
    x.add_argument("--zip", action="store_true", help="RUN.zip, as the dashboard's Export button")
    x.add_argument("--zip-dir", default=".", metavar="DIR", help="where the zips go (default .)")
    x.add_argument("--runs-dir", default=None)
    x.add_argument("--data-dir", default=None, help="where the run's dataset is (for the reconstructions)")

    from .sweep_exec import add_parser as add_sweep_parser

    add_sweep_parser(sub)
    return p


_TRAIN_FIELDS = {"dataset": "dataset", "arch": "arch", "latent_dim": "latent_dim", "hidden_dim": "hidden_dim",
                 "beta": "beta", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
                 "warmup_epochs": "warmup_epochs", "free_bits": "free_bits", "likelihood": "likelihood",
                 "device": "device", "seed": "seed", "train_size": "train_size", "evidence_every": "evidence_every",
                 "channels": "channels", "image_size": "image_size"}
_TRAIN_FIELDS["snapshot_budget_mb"] = "snapshot_budget_mb"  # the time-lapse (vae_core/snapshots.py)
_TRAIN_FIELDS["precision"] = "precision"  # bf16 mixed precision (vae_core/devices.py mixed_dtype)


def _dataset_arg(value: str) -> str:
    """A dataset name as --dataset takes it: a known name or folder:PATH (checked fully by TrainConfig)."""
    if value.startswith("folder:") or value in DATASETS + COLOUR_DATASETS:
        return value
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(DATASETS + COLOUR_DATASETS)} "
                                     "or folder:PATH)")


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    ch = {field: getattr(args, a) for a, field in _TRAIN_FIELDS.items() if getattr(args, a) is not None}
    if args.no_binarize:
        ch["binarize"] = False
    return ch


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived before a run was training: nothing to save, end at once."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _StopOnSignal:
    """SIGINT and SIGTERM end a CLI run cleanly: the trainer stops at the current step and checkpoints.

    Before a run trains, a signal raises _Interrupted (nothing was trained, nothing to save). Once
    it trains, the handler only asks the trainer to stop; the main thread then waits for the
    training thread to end, so the process never exits while torch works in another thread (which
    aborted with "terminate called without an active exception"). A third signal ends the
    process at once (the run then reads as interrupted and resumes from its last checkpoint).
    """

    def __init__(self) -> None:
        import signal

        self.signal = signal
        self.signum: int | None = None
        self.count = 0
        self.run: Any = None
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    def __call__(self, signum: int, _frame: Any) -> None:
        self.count += 1
        self.signum = self.signum or signum
        if self.run is None:
            raise _Interrupted(signum)
        if self.count == 1:
            self.run.trainer.request_stop()
        elif self.count == 2:
            print("\nstill saving the checkpoint; signal again to quit without it", file=sys.stderr)
        else:
            for s in self._old:
                self.signal.signal(s, self.signal.SIG_DFL)
            self.signal.raise_signal(signum)

    def exit_code(self) -> int:
        return 128 + int(self.signum or 0)

    def restore(self) -> None:
        for s, h in self._old.items():
            self.signal.signal(s, h)


def cmd_train(args: argparse.Namespace) -> int:
    from . import runs
    from .lab import Lab

    runs_dir = Path(args.runs_dir) if args.runs_dir else runs.default_runs_dir()
    if args.resume and args.fork:
        raise CliError("use either --resume or --fork, not both")
    if args.name is not None:
        if args.resume:
            raise CliError("--resume keeps the run's name; rename it in the Runs tab, or use --fork with --name")
        runs.sanitize_name(args.name)  # a bad name fails now, not after the data are loaded
    changes = _changes(args)
    if args.tensorboard_dir:  # a missing package is one line now, before anything trains
        _interop_check(tensorboard=True)

    from . import distributed

    world = None
    if distributed.launched():  # torchrun: one run on N processes (DDP); rank 0 runs this CLI's run
        world = distributed.init(args.device)
        if not world.leader:
            return distributed.follow_leader(args, world)
    signals = _StopOnSignal()
    # One run, in the foreground: no queue (max_runs=1) and all cores unless --threads says otherwise.
    lab = Lab(runs_dir, max_runs=1, data_dir=args.data_dir, num_threads=args.threads)
    if world is not None:
        distributed.adopt(lab, world)
    try:
        run = _start_run(lab, args, changes, runs_dir)
        signals.run = run
        tb = _attach_tensorboard(run, Path(args.tensorboard_dir)) if args.tensorboard_dir else None
        if signals.signum is not None:  # a signal between the start and the line above
            run.trainer.request_stop()
        if args.name is not None and run.name != args.name:
            clean = runs.sanitize_name(args.name)
            why = f"a run named {clean!r} already exists" if run.name != clean else "names keep only letters, " \
                "digits and . _ = + -"
            print(f"note: {why}; this run is named {run.name!r}", file=sys.stderr)
        try:
            return _watch(run, args, signals)
        finally:
            if tb is not None:  # TensorBoard events of a run that ended before the listener came
                tb.close()
    except _Interrupted as e:
        signals.signum = e.signum
        lab.shutdown(timeout=600)  # a run that started as the signal came stops here and checkpoints
        print(f"\ninterrupted by {_signal_name(e.signum)} before training began; nothing was trained",
              file=sys.stderr)
        return signals.exit_code()
    finally:
        signals.restore()


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _start_run(lab: Any, args: argparse.Namespace, changes: dict[str, Any], runs_dir: Path) -> Any:
    # The same resume and fork rules as the dashboard's: both go through the Lab.
    if args.resume:
        run_dir = _run_dir_arg(args.resume, runs_dir)
        fixed = set(changes) - {"beta", "lr", "warmup_epochs", "free_bits", "epochs", "device"}
        if fixed:
            raise CliError(f"--resume keeps the run's {', '.join(sorted(fixed))}; use --fork or a new run to change them")
        live = {k: v for k, v in changes.items() if k in LIVE_FIELDS}
        return lab.resume(run_dir, epochs=changes.get("epochs"), live=live, device=changes.get("device"), check=True)
    if args.fork:
        parent = _run_dir_arg(args.fork, runs_dir)
        fixed = set(changes) - {"beta", "lr", "warmup_epochs", "free_bits", "epochs", "device", "seed"}
        if fixed:
            raise CliError(f"a fork keeps its parent's {', '.join(sorted(fixed))}; start a new run to change them")
        live = {k: v for k, v in changes.items() if k in LIVE_FIELDS}
        return lab.fork(parent, name=args.name, epochs=changes.get("epochs"), device=changes.get("device"),
                        seed=changes.get("seed"), check=True, **live)
    chosen = "dataset" not in changes
    if chosen:  # the best set on this machine, never a download (sources.default_dataset)
        from .sources import default_dataset

        changes["dataset"] = default_dataset(args.data_dir)
    run = lab.start(RunConfig().replace(**changes), name=args.name, check=True)
    if chosen and not args.quiet:  # said once the settings passed: a bad one is the only line
        print(f"dataset: {changes['dataset']} (the default here; --dataset chooses)", file=sys.stderr)
    return run


def _watch(run: Any, args: argparse.Namespace, signals: _StopOnSignal) -> int:
    """Wait for the training thread to end (however it ends), then say how it went."""
    bar = None if args.quiet else _progress_bar(run)
    try:
        while run.is_alive():
            run.join(0.2)
            if bar:
                bar.refresh_from(run)
    finally:
        if bar:
            bar.close()
    st = run.status()
    resume = f"resume with: python -m vae_core train --resume {run.run_dir}"
    if signals.signum is not None:
        if st.state == "failed":
            print(f"\n{_signal_name(signals.signum)}: training failed: {st.message}", file=sys.stderr)
        else:
            print(f"\n{_signal_name(signals.signum)}: {st.message}; {resume}", file=sys.stderr)
        return signals.exit_code()
    if st.state == "failed":
        raise CliError(f"training failed: {st.message}")
    last = [m for m in run.metrics() if m["split"] == "test"]
    if last:
        m = last[-1]
        print(f"test ELBO {m['elbo']:.2f}  recon {m['recon']:.2f}  KL {m['kl']:.2f}  ({unit_label(run.config)})")
    if st.state == "stopped":
        print(f"{st.message}; {resume}", file=sys.stderr)
    print(f"run saved in {run.run_dir}")
    return 0


def _run_dir_arg(value: str, runs_dir: Path) -> Path:
    path = Path(value)
    if path.suffix == ".zip":
        from .transfer import import_zip

        return import_zip(path, runs_dir)
    if not path.is_dir() and (runs_dir / value).is_dir():
        path = runs_dir / value
    if not path.is_dir():
        raise CliError(f"no run directory at {value}")
    return path


class _progress_bar:
    """A tqdm bar over steps with loss and samples/s, fed by polling the trainer's status."""

    def __init__(self, run: Any) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm(total=0, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.last: dict[str, Any] = {}
        run.add_listener(self._on_row)

    def _on_row(self, row: dict[str, Any]) -> None:
        self.last[row["split"]] = row

    def refresh_from(self, trainer: Any) -> None:
        st = trainer.status()
        if st.total_steps and self.tqdm.total != st.total_steps:
            self.tqdm.total = st.total_steps
        self.tqdm.n = st.step
        post = {"epoch": f"{st.epoch:.2f}", "samples/s": f"{st.samples_per_s:,.0f}"}
        if "train" in self.last:
            post["loss"] = f"{self.last['train']['loss']:.1f}"
        if "test" in self.last:
            post["test_elbo"] = f"{self.last['test']['elbo']:.1f}"
        self.tqdm.set_postfix(post, refresh=False)
        self.tqdm.refresh()

    def close(self) -> None:
        self.tqdm.close()


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - {"elbo", "mig", "dci", "tc"})
    if unknown or not metrics:
        raise CliError(f"--metrics takes elbo, mig, dci, tc (comma-separated); got {args.metrics!r}")
    if "elbo" not in metrics:  # only what disentangle measures: no bounds, no grid
        from .disentangle import evaluate_run as disentangle_run

        return _print_result(disentangle_run(Path(args.run_dir), tuple(metrics), seed=args.seed), args)
    if not 1 <= args.iwae_k <= 5000:
        raise CliError("--iwae-k must be between 1 and 5000")
    if not 1 <= args.num_examples <= MAX_EXAMPLES:
        raise CliError(f"--num-examples must be between 1 and {MAX_EXAMPLES:,}")
    if not 0 <= args.grid <= MAX_GRID:
        # n^2 decoder passes per example: n = 3000 asked for 9 million per image (hours, and gigabytes).
        raise CliError(f"--grid must be between 0 (no grid) and {MAX_GRID} points per axis")
    if args.grid_examples is None:
        args.grid_examples = min(16, args.num_examples)
    if not 1 <= args.grid_examples <= args.num_examples:
        raise CliError(f"--grid-examples must be between 1 and --num-examples ({args.num_examples})")
    result = evaluate_run(Path(args.run_dir), k=args.iwae_k, num_examples=args.num_examples,
                          grid=args.grid, seed=args.seed, grid_examples=args.grid_examples)
    if len(metrics) > 1:
        from .disentangle import evaluate_run as disentangle_run

        result.update(disentangle_run(Path(args.run_dir), tuple(m for m in metrics if m != "elbo"), seed=args.seed))
    return _print_result(result, args)


def _print_result(result: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    import dataclasses

    from .lab import Lab

    rows = Lab(args.runs_dir).list_runs()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    if not rows:
        print("no runs yet")
        return 0
    print(f"{'name':<40} {'dataset':<13} {'arch':<4} {'z':>3} {'beta':>6} {'epochs':>7} {'best test ELBO':>15}  status")
    for r in rows:
        best = f"{r.best_test_elbo:.2f}" if r.best_test_elbo is not None else "-"
        print(f"{r.name:<40} {r.dataset:<13} {r.arch:<4} {r.latent_dim:>3} {r.beta:>6g} "
              f"{r.epochs_done:>3}/{r.epochs_planned:<3} {best:>15}  {r.status}"
              + (f" on {r.host}" if r.host and r.status in ("running", "paused") else ""))
    return 0


def _interop_check(**wanted: bool) -> None:
    from .interop import MissingPackage, check_packages

    try:
        check_packages(**wanted)
    except MissingPackage as e:
        raise CliError(str(e)) from None


def _attach_tensorboard(run: Any, out_dir: Path) -> Any:
    from .interop import TensorBoardListener

    tb = TensorBoardListener(run, out_dir)
    print(f"TensorBoard: tensorboard --logdir {out_dir}", file=sys.stderr)
    return tb


def _export_run_dir(value: str, runs_dir: Path) -> Path:
    """A run directory given by path or by name under runs_dir (never a zip: export reads, it imports nothing)."""
    path = Path(value)
    if not path.is_dir() and (runs_dir / value).is_dir():
        path = runs_dir / value
    if not path.is_dir():
        raise CliError(f"no run directory at {value}")
    return path


def cmd_export(args: argparse.Namespace) -> int:
    from . import interop, model_files, runs

    if not (args.tensorboard or args.mlflow or args.safetensors or args.zip):
        raise CliError("say what to write: --tensorboard, --mlflow, --safetensors and/or --zip")
    _interop_check(tensorboard=args.tensorboard, mlflow=args.mlflow, safetensors=args.safetensors)
    runs_dir = Path(args.runs_dir) if args.runs_dir else runs.default_runs_dir()
    paths = [_export_run_dir(v, runs_dir) for v in args.runs]  # every name checked before anything is written
    for run_dir in paths:
        runs.read_config(run_dir)
        if not (run_dir / runs.CHECKPOINT).is_file():
            raise runs.RunFileError(f"{run_dir.name} has no checkpoint yet")
    for run_dir in paths:
        try:
            if args.safetensors:
                print(f"{run_dir.name}: {model_files.write_model_files(run_dir)}")
            if args.tensorboard:
                log_dir = interop.export_tensorboard(run_dir, Path(args.tensorboard_dir), data_dir=args.data_dir)
                print(f"{run_dir.name}: {log_dir}")
            if args.mlflow:
                rid, uri = interop.export_mlflow(run_dir, args.mlflow_uri, args.mlflow_experiment)
                print(f"{run_dir.name}: MLflow run {rid} at {uri}")
            if args.zip:
                from .transfer import export_zip

                target = Path(args.zip_dir) / f"{run_dir.name}.zip"
                target.parent.mkdir(parents=True, exist_ok=True)
                runs.atomic_write_bytes(target, export_zip(run_dir))
                print(f"{run_dir.name}: {target}")
        except interop.MissingPackage as e:
            raise CliError(str(e)) from None
    if args.tensorboard:
        print(f"view with: tensorboard --logdir {args.tensorboard_dir}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .records import DatasetUnavailable  # torch-free: a usage error needs no torch
    from .runs import RunFileError

    try:
        args = _parser().parse_args(argv)
        if args.command == "sweep":
            from .sweep_exec import cmd_sweep

            return cmd_sweep(args)
        return {"train": cmd_train, "evaluate": cmd_evaluate, "runs": cmd_runs,
                "export": cmd_export}[args.command](args)
    except (CliError, ConfigError, DatasetUnavailable, RunFileError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (CliError, ConfigError)) else EXIT_FAILED
    except OSError as e:  # a full disk, a read-only runs directory, a file that cannot be read
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or _one_line(e)}{where}", file=sys.stderr)
        return EXIT_FAILED
    except MemoryError:
        print("error: out of memory; ask for fewer examples or a smaller grid", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C in evaluate or runs (train handles its signals itself): nothing to save
        print("\ninterrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
