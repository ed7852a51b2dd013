"""Choosing the training device and torch's thread count."""
from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence

import torch

from .config import ConfigError


def available_devices() -> dict[str, bool]:
    mps = getattr(torch.backends, "mps", None)
    return {"cpu": True, "cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available())}


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU; asking for a missing one is a clear error."""
    have = available_devices()
    if name == "auto":
        return torch.device("cuda" if have["cuda"] else "mps" if have["mps"] else "cpu")
    if name not in have:
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    if not have[name]:
        raise ConfigError(f"{name.upper()} was requested but is not available on this machine; use device 'cpu' (or 'auto')")
    return torch.device(name)


def mixed_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run's training steps: None for float32, bfloat16 for "bf16".

    bf16 runs where torch autocasts to it: the CPU (fast with AMX or AVX512-BF16, which oneDNN uses;
    slower than float32 without them) and CUDA GPUs that support it (Ampere and later). MPS is refused.
    """
    if precision != "bf16":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 support; "
                          "use precision fp32")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"precision bf16 runs on a CPU or a CUDA GPU, not on {device.type}; use precision fp32")
    return torch.bfloat16


def describe_device(device: torch.device, threads: int | None = None, note: str = "") -> str:
    """e.g. 'cpu (2 threads)': torch's thread count now, unless `threads` says which; `note` is appended."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        n = torch.get_num_threads() if threads is None else threads
        return f"cpu ({n} thread{'s' if n != 1 else ''}{'; ' + note if note else ''})"
    return device.type


def default_threads(*, sharing_with_server: bool) -> int:
    """Threads for the training loop.

    torch.set_num_threads is process-wide. Headless, use every core; beside a web server
    on a small machine, leave one core to it: a 2-thread loop competing with a busy
    server on 2 cores was measured several times slower than a 1-thread loop.
    """
    env = os.environ.get("VAE_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if sharing_with_server and cores <= 4 else cores


class ThreadTuner:
    """Chooses torch's CPU thread count by measuring, because the best count depends on load.

    Beside a web server and a browser on a 2-core machine, 2 threads are fastest while the
    page is quiet and several times slower than 1 thread while it redraws (OpenMP threads
    wait on each other at every barrier when one is descheduled). The tuner times blocks of
    steps, uses the faster count and re-tries the runner-up for a short block now and then, so it
    follows the load as it changes. Each re-try that confirms the choice doubles the wait
    before the next one (from `explore_every` blocks up to `max_explore_every`) and lasts half
    a block: a re-try is a slow block, and with a 1-second live refresh the measured choice
    rarely changes. When the choice does change, the other count is re-checked after
    `explore_every` blocks again: its speed is old, and the first one of a run may have been
    timed while the page loaded (traced: 2 threads at 1/8 of their speed, after which the run
    trained on one thread for 16 blocks, about 5 s). The count in use is timed all the time, so
    a load that slows it shows without a re-try.
    """

    def __init__(self, choices: tuple[int, ...], *, block: int = 20, explore_every: int = 4,
                 max_explore_every: int = 512) -> None:
        self.choices = tuple(sorted(set(c for c in choices if c >= 1))) or (1,)
        self.block = block
        self.trial_block = max(5, block // 2)
        self.explore_every, self.max_explore_every = explore_every, max(explore_every, max_explore_every)
        self.speed: dict[int, float] = {}  # EMA of (median) steps per second at each count
        self.blocks = 0
        self.current = self.choices[-1]
        self._chosen: int | None = None  # the count chosen after the last block
        self._wait = explore_every  # blocks between re-tries, doubled while the choice holds
        self._next_try = explore_every

    def best(self) -> int:
        return max(self.speed, key=self.speed.get)

    def trying(self) -> bool:
        """Whether the current block re-tries the runner-up."""
        return bool(self.speed) and len(self.speed) == len(self.choices) and self.current != self.best()

    def block_size(self) -> int:
        """Steps to time before the next record(): a re-try is shorter, as it is usually the slower count."""
        return self.trial_block if self.trying() else self.block

    def record(self, step_seconds: Sequence[float]) -> int:
        """Record a block of steps run at self.current (seconds each); return the count for the next block.

        A block's speed is 1 / its median step time: a page refresh holding the GIL stalls a few
        steps whatever the thread count, and those outliers must not decide the choice.
        """
        was_trial = self.trying()
        median = statistics.median(step_seconds) if len(step_seconds) else 0.0
        if median > 0:
            rate = 1.0 / median
            old = self.speed.get(self.current)
            # A re-try replaces its count's old speed, measured under the load of long ago.
            self.speed[self.current] = rate if old is None or was_trial else 0.5 * old + 0.5 * rate
        self.blocks += 1
        untried = [c for c in self.choices if c not in self.speed]
        if untried:
            self.current = untried[0]
            return self.current
        best = self.best()
        if was_trial and best != self.current:  # the re-try lost again: wait longer before the next
            self._wait = min(self._wait * 2, self.max_explore_every)
            self._next_try = self.blocks + self._wait
        elif best != self._chosen:
            # The choice changed: a re-try won, or the count in use slowed below the other's speed. That
            # speed is old (measured under another load, the first time maybe while the page loaded), so
            # re-check soon rather than after a wait grown long while the old choice held.
            self._wait = self.explore_every
            self._next_try = self.blocks + self._wait
        self._chosen = best
        if self.blocks >= self._next_try and len(self.choices) > 1:
            self._next_try = self.blocks + self._wait
            self.current = max((c for c in self.choices if c != best), key=lambda c: self.speed[c])  # once
        else:
            self.current = best
        return self.current


class QuietWindows:
    """When a tuned training loop should train on fewer threads: while a live refresh is drawn.

    request(now, seconds) marks `seconds` from now as quiet (the dashboard calls it as a refresh
    starts). The browser's work begins before that call, though: its timer fires and sends the
    rerun request several ms earlier, and a 2-thread step caught by it stalls at every OpenMP
    barrier (traced: one 3.8 ms step took 40-45 ms). So once the calls come at a steady rhythm
    (the live panel's timer ticks every second, to within ~1%), the window also opens `lead`
    seconds before the next call is due, and closes `grace` seconds after it if none comes.
    Calls from several sessions do not form a rhythm, and then only the requested windows count.
    """

    def __init__(self, *, lead: float = 0.03, grace: float = 0.06, history: int = 4, tolerance: float = 0.03) -> None:
        self.lead, self.grace, self.tolerance = lead, grace, tolerance
        self._calls: deque[float] = deque(maxlen=history)
        self._until = 0.0  # end of the requested window
        self._due: float | None = None  # when the next call is expected, if the calls keep a rhythm
        self._lock = threading.Lock()  # sessions' script threads may call at once

    def request(self, now: float, seconds: float) -> None:
        with self._lock:
            self._calls.append(now)
            self._until = max(self._until, now + seconds)
            self._due = None
            if len(self._calls) == self._calls.maxlen:
                calls = list(self._calls)
                gaps = [b - a for a, b in zip(calls, calls[1:])]
                period = statistics.median(gaps)
                if 0.2 <= period <= 5.0 and max(abs(g - period) for g in gaps) <= self.tolerance * period:
                    self._due = now + period

    def quiet(self, now: float) -> bool:
        due = self._due
        return now < self._until or (due is not None and due - self.lead <= now < due + self.grace)

    def requested(self) -> bool:
        """Whether any window was ever requested."""
        return bool(self._calls)


class CpuShare:
    """How a training loop shares a small CPU with a web server: the one policy object the loop calls.

    `with share.step(): train_step(...)` picks the thread count for the step (the tuner's choice, or
    its smallest count inside a quiet window the page asked for with make_room) and times the steps
    the tuner chose, in blocks. The headless CLI and fixed --threads runs use NO_SHARING instead.
    """

    def __init__(self, choices: tuple[int, ...]) -> None:
        self.tuner = ThreadTuner(choices)
        self.quiet = QuietWindows()
        self._now: int | None = None  # the thread count set last
        self._times: list[float] = []  # seconds per step of the tuner's current block
        self._block = self.tuner.block_size()  # fixed when a block starts

    @classmethod
    def for_device(cls, device: torch.device, *, num_threads: int | None) -> "CpuShare | NoSharing":
        """A policy for a CPU run beside a server with more than one core and no fixed thread count."""
        cores = os.cpu_count() or 1
        if device.type != "cpu" or cores < 2 or num_threads or "VAE_NUM_THREADS" in os.environ:
            return NoSharing()
        return cls((max(1, cores // 2), cores))

    def make_room(self, seconds: float) -> None:
        self.quiet.request(time.monotonic(), seconds)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        making_room = self.quiet.quiet(time.monotonic())
        want = self.tuner.choices[0] if making_room else self.tuner.current
        if want != self._now:
            torch.set_num_threads(want)
            self._now = want
        t0 = time.perf_counter()
        yield
        if not making_room:  # the tuner times only steps it chose the thread count for
            self._times.append(time.perf_counter() - t0)
            if len(self._times) >= self._block:
                self.tuner.record(self._times)
                self._times, self._block = [], self.tuner.block_size()

    def describe(self, device: torch.device) -> str:
        """The device with the count the tuner chose, not the one in use this instant (1 while the page redraws)."""
        n, quiet = self.tuner.current, self.tuner.choices[0]
        return describe_device(device, n, f"{quiet} while the page redraws" if n != quiet else "")


class NoSharing:
    """The policy of a run that has the machine to itself (the CLI, a fixed --threads): nothing to do."""

    _null = contextlib.nullcontext()

    def step(self) -> contextlib.AbstractContextManager[None]:
        return self._null

    def make_room(self, seconds: float) -> None:
        pass

    def describe(self, device: torch.device) -> str:
        return describe_device(device)
