"""Choosing the training device and torch's thread count."""
from __future__ import annotations

import os

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


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
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
