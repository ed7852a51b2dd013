"""Starting a run on N processes from a server: `torchrun ... -m vae_core train --resume RUN` in the background.

The Lab creates the run directory (config.json, a status that says it is starting) and hands it
to torchrun; from then on the run is followed through its files like any run another process
trains (lab.FollowedRun) and steered through control.json. torchrun's own output goes to
LOG in the run directory; if the processes end before rank 0 has written a status, a watcher
thread records the failure there with the one line that says why.

Imports no torch: the dashboard reaches this through the Lab.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from . import runs

LOG = "torchrun.log"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def max_processes(cuda_devices: int) -> int:
    """How many processes one run may use here: one per GPU where there are several, else one per CPU core."""
    if cuda_devices > 1:
        return cuda_devices
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def torchrun_command(run_dir: Path, processes: int, *, data_dir: str | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "vae_core", "train", "--resume", str(run_dir), "--quiet",
            *(["--data-dir", str(data_dir)] if data_dir else [])]


def launch_torchrun(run_dir: Path, processes: int, *, data_dir: str | None = None) -> subprocess.Popen:
    """Start torchrun on an existing, not yet trained run directory; returns at once."""
    run_dir = Path(run_dir)
    runs.write_status(run_dir, "idle", f"starting {processes} training processes (torchrun)")
    # This checkout's vae_core in the children, whatever the working directory or an installed copy.
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with open(run_dir / LOG, "ab") as log:
        # Its own session: the run outlives the server (as a CLI run would) and a Ctrl-C there does not reach it.
        proc = subprocess.Popen(torchrun_command(run_dir, processes, data_dir=data_dir), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(run_dir.parent),
                                env={**os.environ, "PYTHONPATH": path}, start_new_session=True)
    threading.Thread(target=_watch, args=(proc, run_dir), name=f"vae-torchrun-{run_dir.name}", daemon=True).start()
    return proc


def _watch(proc: subprocess.Popen, run_dir: Path) -> None:
    code = proc.wait()
    try:
        st = runs.read_status_raw(run_dir)
        if st.get("pid") == os.getpid() and st.get("state") == "idle":  # rank 0 never took the run over
            runs.write_status(run_dir, "failed", _why(run_dir, code))
    except OSError:  # the run was deleted meanwhile
        pass


def _why(run_dir: Path, code: int) -> str:
    """The CLI's one-line error from the log (rank 0 says `error: ...`), else the exit code."""
    try:
        lines = (run_dir / LOG).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [ln.strip() for ln in lines if ln.strip().startswith("error: ")]
    if errors:
        return f"the training processes could not start: {errors[-1][len('error: '):][:300]}"
    return f"the training processes ended (exit code {code}) before training; see {LOG} in the run directory"
