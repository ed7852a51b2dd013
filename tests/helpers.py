"""Small helpers the test modules share."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from vae_core.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def train_to_end(trainer: Trainer, *, epochs: int | None = None, timeout: float = 60.0) -> Trainer:
    """Start `trainer` (for `epochs` more, if given), wait for its thread and check that the run finished."""
    trainer.start(epochs=epochs)
    trainer.join(timeout)
    assert trainer.status().state == "finished", trainer.status().message
    return trainer


def poll_until(predicate, timeout: float = 120.0, what: str = "condition", every: float = 0.1):
    """Wait for a state, however slow the machine is today; return the predicate's value, or fail with what
    was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(tmp_path: Path, **env: str) -> Iterator[str]:
    """`streamlit run dashboard/app.py` on a free port with its own runs directory; yields its URL."""
    port = free_port()
    env = {**os.environ, "VAE_RUNS_DIR": str(tmp_path / "runs"), "VAE_DATA_CACHE": str(tmp_path / "data"), **env}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


_WATCH_TORCH = """
import importlib.abc, os, runpy, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
sys.meta_path.insert(0, Watch())
"""


def spincount_when_torch_loads(code: str, *args: str, spincount: str | None = None) -> str:
    """Run `code` in a fresh interpreter at the checkout's root (argv: args) with GOMP_SPINCOUNT unset, or set to
    `spincount`; returns GOMP_SPINCOUNT as it was when torch was first imported, as a list: "['10000']"."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if spincount is not None:
        env["GOMP_SPINCOUNT"] = spincount
    program = _WATCH_TORCH + code + "\nprint(seen)\n"
    return subprocess.run([sys.executable, "-c", program, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=600).stdout.strip().splitlines()[-1]
