"""Moving runs between machines: a zip of the whole run directory, and importing one safely."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from . import runs
from .config import RunConfig

MAX_ZIP_BYTES = 512 * 1024 * 1024  # uncompressed total; a run is a few MB
ALLOWED = {runs.CONFIG, runs.METRICS, runs.CHECKPOINT, runs.STATUS}


def export_zip(run_dir: Path) -> bytes:
    """The run directory's files (config with seed and versions, metrics, checkpoint, status) as zip bytes."""
    run_dir = Path(run_dir)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(ALLOWED):
            if (run_dir / name).exists():
                z.write(run_dir / name, f"{run_dir.name}/{name}")
    return buf.getvalue()


def import_zip(source: Path | bytes, runs_dir: Path, name: str | None = None) -> Path:
    """Unpack a run zip into a new directory under runs_dir and return it.

    Only the known run files are taken, by their base names, so no member can write
    outside the new directory (absolute paths and '..' are refused outright); the
    checkpoint must load safely before the run is kept.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise runs.RunFileError(f"{'the upload' if isinstance(source, bytes) else source} is not a zip file") from None
    members: dict[str, zipfile.ZipInfo] = {}
    top = None
    for info in z.infolist():
        parts = Path(info.filename).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise runs.RunFileError(f"zip member {info.filename!r} points outside the run; refusing the archive")
        if info.is_dir():
            continue
        if Path(info.filename).name in ALLOWED:
            members[Path(info.filename).name] = info
            top = top or (parts[0] if len(parts) > 1 else None)
    if runs.CONFIG not in members or runs.CHECKPOINT not in members:
        raise runs.RunFileError("the zip holds no run: it needs config.json and checkpoint.pt")
    if sum(i.file_size for i in members.values()) > MAX_ZIP_BYTES:
        raise runs.RunFileError(f"the zip unpacks to more than {MAX_ZIP_BYTES // 2**20} MB; refusing it")
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    try:
        raw = json.loads(z.read(members[runs.CONFIG]))
        cfg = RunConfig.from_dict({k: v for k, v in raw.items() if k in ("model", "train")})
    except (ValueError, AttributeError) as e:  # JSONDecodeError and ConfigError are ValueErrors
        raise runs.RunFileError(f"config.json in the zip is not a valid run config ({e})") from None
    target = runs.create_run_dir(runs_dir, cfg, name or top or None)
    try:
        for fname, info in members.items():
            (target / fname).write_bytes(z.read(info))
        runs.load_checkpoint(target / runs.CHECKPOINT)  # refuse unsafe or corrupt weights now, not later
        runs.read_config(target)
    except Exception:
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
        raise
    return target
