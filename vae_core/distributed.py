"""One run on N processes: `torchrun ... -m vae_core train` with DistributedDataParallel.

torchrun starts N copies of the CLI. Rank 0 is the ordinary CLI run whose Lab makes DistTrainers:
it alone writes the run directory (config, metrics, status heartbeats, checkpoints, evidence),
reads control.json and evaluates. Every other rank (follow_leader) receives the run from rank 0
(config, weights, optimiser state, position), trains its share of each global batch and writes
nothing. NCCL carries GPU tensors (one GPU per process, LOCAL_RANK), gloo CPU ones.

The ranks meet only at points every one of them reaches in the same order:
- the start: rank 0 broadcasts the run once it has built it (new, resumed or forked alike);
- each step's backward: DDP's gradient all-reduce;
- each log interval: ONE all-reduce carries the metric sums (each rank adds its share of the global
  batch) and rank 0's steering (stop, pause, live settings; the others add zeros), so all ranks log
  the same numbers, fail together on a NaN and stop or pause at the same step;
- each epoch end: rank 0 evaluates and checkpoints, then broadcasts whether to go on;
- while paused: rank 0 broadcasts its decision every POLL_S (still paused, one step, resume, stop).
Between log points a pause or stop request waits for the next one (at most log_every steps).
"""
from __future__ import annotations

import argparse
import atexit
import datetime as dt
import os
import signal
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import data as data_mod
from . import runs
from .config import LIVE_FIELDS, ConfigError, RunConfig
from .objectives import ElboTerms, elbo_loss, elbo_terms
from .run_math import RunMath
from .trainer import Trainer

POLL_S = 0.5  # while paused, rank 0 tells the others what to do this often
TIMEOUT = dt.timedelta(minutes=30)  # a collective waits this long (a long evidence estimate on rank 0)
PARAM_DUMP_ENV = "VAE_DDP_PARAM_DUMP"  # tests: each rank saves its final weights here as rank<r>.pt
EXIT_NO_RUN = 3  # a rank > 0 whose rank 0 never sent a run
_WAIT, _STEP, _RUN, _STOP = 0.0, 1.0, 2.0, 3.0  # rank 0's decisions while paused


@dataclass(frozen=True)
class World:
    """Where this process stands among torchrun's: its rank, how many there are, the backend."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What config.json records about the processes that train the run."""
        return {"world_size": self.world_size, "backend": self.backend,
                "nodes": max(1, self.world_size // max(1, self.local_world_size))}


_WORLD: World | None = None


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def current() -> World:
    if _WORLD is None:
        raise RuntimeError("distributed.init() has not run in this process")
    return _WORLD


def init(device: str | None = None) -> World:
    """Join torchrun's process group (once per process): NCCL for CUDA tensors, gloo for CPU ones."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    env = os.environ
    local_rank = int(env["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and device in (None, "auto", "cuda")
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        # Both: CPU tensors (the start's object broadcast) go through gloo, the run's CUDA ones through NCCL.
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    _WORLD = World(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
                   backend="nccl" if cuda else "gloo")
    atexit.register(_shutdown)
    return _WORLD


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def threads_per_process(world: World) -> int:
    """The machine's cores shared among the processes on this node (2 processes on 2 cores: 1 thread each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, world.local_world_size))


def adopt(lab: Any, world: World) -> None:
    """Make rank 0's Lab train DistTrainers, on its share of the node's cores unless --threads says otherwise."""
    lab.trainer_class = DistTrainer
    lab.num_threads = lab.num_threads or threads_per_process(world)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ------------------------------------------------------------------ the math of one rank

class _Elbo(nn.Module):
    """The VAE's ELBO terms as one forward(), which is what DDP hooks into (it syncs gradients of forward's graph)."""

    def __init__(self, model: nn.Module, generator: torch.Generator) -> None:
        super().__init__()
        self.vae, self.generator = model, generator

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = elbo_terms(self.vae, x, self.generator)
        return tuple(getattr(t, f.name) for f in fields(t))


class DistRunMath(RunMath):
    """RunMath for one rank: the same global batches on every rank, this rank's slice of each, DDP's averaged gradients.

    The batch order comes from a generator seeded alike on all ranks; binarization and the
    reparameterization noise from one seeded per rank (and per starting step), so ranks draw
    independently. Evaluation, evidence and images use the bare model (rank 0 only calls them).
    """

    def __init__(self, config: RunConfig, data: data_mod.ImageData, device: torch.device, *, lr: float,
                 checkpoint: dict[str, Any] | None = None, world: World) -> None:
        super().__init__(config, data, device, lr=lr, checkpoint=checkpoint)
        self.compiled = None  # its step goes through DDP's forward (train_step below), never the compiled loss
        self.world = world
        seed, step = config.train.seed, int((checkpoint or {}).get("step", 0))
        self.order_gen = torch.Generator(device=device)
        if checkpoint is not None and "generator" in checkpoint and device.type == "cpu":
            self.order_gen.set_state(checkpoint["generator"])  # the order stream a single process would continue
        else:
            self.order_gen.manual_seed(seed if step == 0 else _seed(seed, step))
        self.gen.manual_seed(_seed(seed, 1 + world.rank, step))
        self.batcher = data_mod.IndexBatcher(len(self.train_x), config.train.batch_size, self.order_gen, device)
        self._ddp: DistributedDataParallel | None = None

    @property
    def ddp(self) -> DistributedDataParallel:
        """The DDP wrapper, made at the first step: making it is a collective (rank 0's weights go to all), which
        every rank must reach in the same order, so after the start's broadcast of the run, not before it."""
        if self._ddp is None:
            d = self.device
            ids = [d.index if d.index is not None else torch.cuda.current_device()] if d.type == "cuda" else None
            self._ddp = DistributedDataParallel(_Elbo(self.model, self.gen), device_ids=ids)
        return self._ddp

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the global batch `idx` (sizes differ by at most one)."""
        return super().batch(idx.tensor_split(self.world.world_size)[self.world.rank])

    def train_step(self, x: torch.Tensor, *, beta: float, free_bits: float, lr: float) -> torch.Tensor:
        """One Adam step on this rank's slice; returns its share of the global batch's (loss, recon, kl, beta, 1).

        Summed over ranks (the log point's all-reduce) the shares are the global batch's numbers.
        """
        self.set_lr(lr)
        self.model.train()
        terms = ElboTerms(*self.ddp(x))
        loss = elbo_loss(terms, beta=beta, free_bits=free_bits)
        share = len(x) / self.config.train.batch_size  # this rank's fraction of the global batch
        self.opt.zero_grad(set_to_none=True)
        # DDP averages gradients over the W ranks: weighting by share * W makes that the global batch's mean.
        (loss * (share * self.world.world_size)).backward()
        self.opt.step()
        one = torch.ones((), device=x.device)
        w = self.world.world_size
        return torch.stack([loss.detach() * share, terms.recon.detach().mean() * share,
                            terms.kl.detach().mean() * share, one * (beta / w), one / w])

    def checkpoint_state(self) -> dict[str, Any]:
        state = super().checkpoint_state()
        if self.device.type == "cpu":  # the order stream: a resumed run (any number of processes) continues it
            state["generator"] = self.order_gen.get_state()
        return state


# ------------------------------------------------------------------ the trainer of one rank

class DistTrainer(Trainer):
    """A Trainer that trains one rank of a DDP run; only rank 0's persists and follows control.json."""

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        self.world = current()
        kwargs["persist"] = kwargs.get("persist", True) and self.world.leader
        super().__init__(config, **kwargs)
        self._agreed_paused = False  # what all ranks agreed at the last meeting point
        self._agreed_stop = False
        self._parked = False
        self._requested: dict[str, float] | None = None  # rank 0: live settings asked for, due at the next meeting

    def math_class(self, *args: Any, **kwargs: Any) -> DistRunMath:
        return DistRunMath(*args, world=self.world, **kwargs)

    def update(self, **changes: float) -> None:
        """Rank 0, while training: validate now, apply at the next meeting point on every rank at once (a step
        on rank 0 with another β or learning rate than the others' would part their weights for good)."""
        if self.math is None:
            return super().update(**changes)
        with self._lock:
            agreed = dict(self._live)
        super().update(**changes)
        with self._lock:
            self._requested = dict(self._live)
            self._live.update(agreed)

    def check(self) -> data_mod.ImageData:
        data = super().check()
        if self.config.train.batch_size < self.world.world_size:
            raise ConfigError(f"batch size {self.config.train.batch_size} is smaller than the number of processes "
                              f"({self.world.world_size}): each needs at least one image per step")
        return data

    def _device_text(self) -> str:
        return f"{self.world.world_size} × {super()._device_text()} ({self.world.backend})"

    # ---------------------------------------------------------------- the start

    def adopt(self, run: dict[str, Any]) -> None:
        """Ranks > 0: take the run rank 0 broadcast (its state becomes the checkpoint this rank starts from)."""
        with self._lock:
            self._resume_ckpt = {**run["state"], "step": run["step"]}
            self._step, self._epoch, self._epochs_target = run["step"], run["epoch"], run["epochs_target"]
            self._live.update(run["live"])
            self.log_every = run["log_every"]

    def _prepare(self) -> RunMath:
        first = self.math is None
        m = super()._prepare()
        if first and self.world.leader:
            with self._lock:
                run = {"config": self.config.to_dict(), "state": _to_cpu(m.checkpoint_state()), "step": self._step,
                       "epoch": self._epoch, "epochs_target": self._epochs_target, "live": dict(self._live),
                       "log_every": self.log_every}
            dist.broadcast_object_list([run], src=0)
            if self.persist:
                raw = runs.read_json(self.run_dir / runs.CONFIG)
                kept = {k: v for k, v in raw.items() if k not in ("model", "train", "versions")}
                runs.write_config(self.run_dir, self.config, **{**kept, "distributed": self.world.describe()})
        return m

    # ---------------------------------------------------------------- the meeting points

    def _control(self) -> list[float]:
        """Rank 0's steering as numbers: stop, pause, then the live settings (float64: bit-exact on every rank)."""
        with self._lock:
            paused = self._state == "paused" or self._pending_steps > 0
            return [float(self._stop.is_set()), float(paused)] + self._live_locked()

    def _live_locked(self) -> list[float]:
        live = self._requested or self._live
        return [float(live[k]) for k in LIVE_FIELDS]

    def _apply(self, ctl: list[float]) -> None:
        self._agreed_stop = self._agreed_stop or ctl[0] > 0
        self._agreed_paused = ctl[1] > 0
        self._apply_live(ctl[2:])

    def _apply_live(self, values: list[float]) -> None:
        """Every rank, rank 0 included, takes the live settings agreed at this meeting point."""
        with self._lock:
            agreed = dict(zip(LIVE_FIELDS, values))
            self._live.update(agreed)
            if self._requested == agreed:  # not when a newer request came in meanwhile
                self._requested = None

    def _log_train(self, acc: torch.Tensor) -> bool:
        ctl = self._control() if self.world.leader else [0.0] * (2 + len(LIVE_FIELDS))
        vec = torch.cat([acc.double(), torch.tensor(ctl, dtype=torch.float64, device=acc.device)])
        dist.all_reduce(vec)  # the one sync point per log interval: metric sums and rank 0's steering
        acc.copy_(vec[:len(acc)])
        self._apply(vec[len(acc):].tolist())
        return super()._log_train(acc)

    def _end_epoch(self, samples_per_s: float) -> bool:
        ok = super()._end_epoch(samples_per_s) if self.world.leader else True
        vec = [float(ok)] + (self._control() if self.world.leader else [0.0] * (2 + len(LIVE_FIELDS)))
        obj = [vec]
        dist.broadcast_object_list(obj, src=0)
        self._apply(obj[0][1:])
        if not obj[0][0] and not self.world.leader:
            self._finish("failed", "rank 0 ended the run at the end of an epoch")
            return False
        return ok

    def _wait_turn(self) -> bool:
        if self._agreed_stop:
            return False
        if not self._agreed_paused:
            return True  # running: no meeting before the next log point
        while True:
            decision = self._decide() if self.world.leader else [_WAIT] + [0.0] * len(LIVE_FIELDS)
            obj = [decision]
            dist.broadcast_object_list(obj, src=0)
            code = obj[0][0]
            self._apply_live(obj[0][1:])
            if code == _WAIT:
                continue
            self._parked = False
            if code == _STOP:
                self._agreed_stop = True
                return False
            if code == _RUN:
                self._agreed_paused = False
            return True

    def _decide(self) -> list[float]:
        """Rank 0, while all ranks are paused: wait up to POLL_S for a request, then say what all do next."""
        with self._lock:
            go = self._ready_locked()
            if go is None and not self._parked:
                self._message = f"paused at step {self._step}"
        if go is None and not self._parked:
            self._parked = True
            self.sync.write_status()  # so a follower sees the step the run really stays at
        with self._lock:
            if go is None:
                self._wake.wait(POLL_S)
                go = self._ready_locked()
            code = _WAIT if go is None else _STOP if go is False else _RUN if self._state == "running" else _STEP
            return [code] + self._live_locked()

    # ---------------------------------------------------------------- the end

    def _train(self) -> None:
        try:
            super()._train()
        except dist.DistError as e:  # another rank's process ended: its collective broke
            self._lost_peer(e)
        except RuntimeError as e:
            if not _peer_gone(e):
                raise
            self._lost_peer(e)
        dump = os.environ.get(PARAM_DUMP_ENV)
        if dump and self.math is not None:
            torch.save(_to_cpu(self.math.model.state_dict()), Path(dump) / f"rank{self.world.rank}.pt")

    def _lost_peer(self, e: BaseException) -> None:
        print(f"rank {self.world.rank}: {type(e).__name__}: {e}", file=sys.stderr)  # the backend's words, for the log
        self._finish("interrupted", f"another of the {self.world.world_size} training processes ended; "
                                    "resume from the last checkpoint")


def _peer_gone(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset", "broken pipe", "gloo",
                                   "nccl", "timed out", "socket"))


# ------------------------------------------------------------------ ranks > 0

def follow_leader(args: argparse.Namespace, world: World) -> int:
    """Train the run rank 0 broadcasts; write nothing. Rank 0 reports how it went."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank: rank 0 stops them all at one step
    try:
        trainer = from_leader(world, data_dir=args.data_dir, num_threads=args.threads)
    except (dist.DistError, RuntimeError):  # rank 0 ended before training (it said why, in one line)
        return EXIT_NO_RUN
    trainer.start()
    while trainer.is_alive():
        trainer.join(0.5)
    return 0


def from_leader(world: World, *, data_dir: str | None = None, num_threads: int | None = None,
                cls: type[DistTrainer] = DistTrainer) -> DistTrainer:
    """A rank > 0's trainer for the run rank 0 broadcasts as it starts training (blocks until then)."""
    obj: list[Any] = [None]
    dist.broadcast_object_list(obj, src=0)
    run = obj[0]
    trainer = cls(RunConfig.from_dict(run["config"]), persist=False, data_dir=data_dir,
                  num_threads=num_threads or threads_per_process(world))
    trainer.adopt(run)
    return trainer
