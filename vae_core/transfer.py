"""Moving runs between machines: a zip of the whole run directory, and importing one safely.

An import trusts nothing in the archive: its members are checked before anything is unpacked
(names, encryption, compression method, declared sizes), the bytes are counted as they are
inflated (a member whose header lies about its size stops at the limit, never in memory as a
whole), and the run is unpacked into a hidden folder that becomes the run by one rename only
once its config and checkpoint check out. A failed or killed import leaves no listed run.
Every refusal is one line without server paths.
"""
from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

from . import runs
from .config import ConfigError, RunConfig

MAX_ZIP_BYTES = 512 * 1024 * 1024  # uncompressed total; a run is a few MB
MAX_MEMBERS = 10_000  # entries in the archive's directory (a run zip has four)
CHUNK = 1 << 16  # bytes inflated at a time
ALLOWED = {runs.CONFIG, runs.METRICS, runs.CHECKPOINT, runs.STATUS}
SNAPSHOTS = "snapshots"  # the time-lapse's folder (vae_core/snapshots.py): step-NNNNNNNNN.pt files only
MAX_SNAPSHOTS = 1000  # snapshots.MAX_FILES: a run lists no more (its schedule keeps ~3 per doubling of steps)
_SNAPSHOT_NAME = re.compile(r"^step-\d{9}\.pt$")
SMALL = {runs.CONFIG: runs.MAX_JSON_BYTES, runs.STATUS: runs.MAX_JSON_BYTES}  # per-file caps
METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}  # what export_zip writes
# What a damaged archive raises while it is read (a bad CRC, a bad header, corrupt deflate data, ...).
_DAMAGED = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, struct.error, NotImplementedError,
            ValueError, RuntimeError)


def export_zip(run_dir: Path) -> bytes:
    """The run directory's files (config with seed and versions, metrics, checkpoint, status) as zip bytes."""
    run_dir = Path(run_dir)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(ALLOWED):
            if (run_dir / name).exists():
                z.write(run_dir / name, f"{run_dir.name}/{name}")
        for path in _snapshots_in_budget(run_dir):
            z.write(path, f"{run_dir.name}/{SNAPSHOTS}/{path.name}")
    return buf.getvalue()


def _snapshots_in_budget(run_dir: Path) -> list[Path]:
    """The run's time-lapse snapshots, newest first, up to its config's budget (all of them, as training keeps)."""
    from . import snapshots

    try:
        budget = snapshots.budget_bytes(runs.read_config(run_dir))
    except (runs.RunFileError, ConfigError):
        return []
    out, total = [], 0
    for _, path in sorted(snapshots.files(run_dir).items(), reverse=True):
        total += path.stat().st_size
        if total > budget:
            break
        out.append(path)
    return out


def _why(e: BaseException) -> str:
    text = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _members(z: zipfile.ZipFile) -> tuple[dict[str, zipfile.ZipInfo], str | None]:
    """The run's files in the archive by base name, and its top folder; refuses what cannot be read safely."""
    infos = z.infolist()
    if len(infos) > MAX_MEMBERS:
        raise runs.RunFileError(f"the zip has {len(infos):,} entries; a run zip has a handful, refusing it")
    members: dict[str, zipfile.ZipInfo] = {}
    top = None
    for info in infos:
        parts = Path(info.filename).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise runs.RunFileError(f"zip member {info.filename[:100]!r} points outside the run; refusing the archive")
        name = Path(info.filename).name
        if not info.is_dir() and len(parts) >= 2 and parts[-2] == SNAPSHOTS and _SNAPSHOT_NAME.match(name):
            name = f"{SNAPSHOTS}/{name}"  # unpacked into the run's snapshots folder, checked in _check
        elif info.is_dir() or name not in ALLOWED:
            continue
        if info.flag_bits & 0x1:
            raise runs.RunFileError(f"{name} in the zip is encrypted; export the run again without a password")
        if info.compress_type not in METHODS:
            raise runs.RunFileError(f"{name} in the zip uses compression method {info.compress_type}; "
                                    "only stored and deflated members are read")
        if name in members:
            raise runs.RunFileError(f"the zip holds {name} more than once; refusing it")
        members[name] = info
        top = top or (parts[0] if len(parts) > 1 else None)
    if sum(name.startswith(SNAPSHOTS) for name in members) > MAX_SNAPSHOTS:  # each is loaded to be checked
        raise runs.RunFileError(f"the zip holds more than {MAX_SNAPSHOTS} snapshots; a run keeps far fewer, refusing it")
    if runs.CONFIG not in members or runs.CHECKPOINT not in members:
        raise runs.RunFileError("the zip holds no run: it needs config.json and checkpoint.pt")
    # The sizes the archive declares: a quick refusal of an honest big archive. A lying one is caught in _extract.
    if sum(i.file_size for i in members.values()) > MAX_ZIP_BYTES:
        raise runs.RunFileError(f"the zip unpacks to more than {MAX_ZIP_BYTES / 2**20:.3g} MB; refusing it")
    for name, cap in SMALL.items():
        if name in members and members[name].file_size > cap:
            raise runs.RunFileError(f"{name} in the zip is larger than {cap // 1024} kB; refusing it")
    return members, top


def _extract(z: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], dest: Path) -> int:
    """Inflate the members into dest, CHUNK bytes at a time, counting them; returns the bytes written.

    Stops as soon as the total passes MAX_ZIP_BYTES (or a small file its cap), whatever the headers say.
    """
    total = 0
    for name, info in members.items():
        cap = SMALL.get(name, MAX_ZIP_BYTES)
        size = 0
        try:
            (dest / name).parent.mkdir(exist_ok=True)
            with z.open(info) as src, open(dest / name, "xb") as out:
                while True:
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    total += len(chunk)
                    if total > MAX_ZIP_BYTES:
                        raise runs.RunFileError(f"the zip unpacks to more than {MAX_ZIP_BYTES / 2**20:.3g} MB "
                                                "(its headers say less); refusing it")
                    if size > cap:
                        raise runs.RunFileError(f"{name} in the zip is larger than {cap // 1024} kB; refusing it")
                    out.write(chunk)
        except runs.RunFileError:
            raise
        except OSError as e:
            raise runs.RunFileError(f"could not unpack {name}: {_why(e)}") from None
        except _DAMAGED as e:
            raise runs.RunFileError(f"{name} in the zip is damaged ({_why(e)})") from None
    return total


def _check(tmp: Path) -> RunConfig:
    """The unpacked run's config, once config.json, status.json and the checkpoint check out."""
    raw, why = runs.json_problem(tmp / runs.CONFIG)
    cfg = None
    if why is None:
        cfg, why = runs.config_problem(raw)
    if why is not None:
        raise runs.RunFileError(f"the zip's {why}")
    if (tmp / runs.STATUS).exists():
        st, why = runs.json_problem(tmp / runs.STATUS)
        why = why or (f"status.json: {runs.status_problem(st)}" if runs.status_problem(st) else None)
        if why is not None:
            raise runs.RunFileError(f"the zip's {why}")
        if st.get("state") in runs.ACTIVE_STATES:  # exported while it trained: here nothing trains it
            keep = {k: v for k, v in st.items() if k not in ("pid", "pid_start", "host", "heartbeat")}
            runs.atomic_write_json(tmp / runs.STATUS, {**keep, "state": "stopped",
                                                       "message": "imported while it was training; resume continues "
                                                                  "from its last checkpoint"})
    try:
        runs.load_checkpoint(tmp / runs.CHECKPOINT)  # refuse unsafe or corrupt weights now, not later
    except runs.RunFileError as e:  # its message starts with the temp folder's path: name the zip instead
        raise runs.RunFileError(str(e).replace(str(tmp / runs.CHECKPOINT), "checkpoint.pt in the zip")
                                .replace(str(tmp), "the zip")) from None
    _check_snapshots(tmp, cfg)
    return cfg


def _check_snapshots(tmp: Path, cfg: RunConfig) -> None:
    """Every time-lapse snapshot must load as this run's weights; then the folder is thinned to the budget."""
    from . import snapshots

    for step, path in snapshots.files(tmp).items():
        try:
            got, _ = snapshots.load(path, cfg.model)
        except runs.RunFileError as e:  # it names snapshots/<file>, never the temp folder
            raise runs.RunFileError(f"the zip's {str(e).replace(str(tmp), 'the zip')}") from None
        if got != step:
            raise runs.RunFileError(f"the zip's {SNAPSHOTS}/{path.name} holds step {got}; refusing it")
    snapshots.enforce_budget(tmp, snapshots.budget_bytes(cfg), snapshots.origin_of(tmp))


def import_zip(source: Path | bytes, runs_dir: Path, name: str | None = None) -> Path:
    """Unpack a run zip into a new directory under runs_dir and return it.

    Only the known run files are taken, by their base names, so no member can write
    outside the new directory (absolute paths and '..' are refused outright); the
    checkpoint must load safely before the run is kept.
    """
    label = "the upload" if isinstance(source, bytes) else Path(source).name
    try:
        z = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
    except FileNotFoundError:
        raise runs.RunFileError(f"{source} is missing") from None
    except (OSError, *_DAMAGED) as e:
        raise runs.RunFileError(f"{label} is not a zip file ({_why(e)})") from None
    runs_dir = Path(runs_dir)
    with z:
        try:
            members, top = _members(z)
        except runs.RunFileError:
            raise
        except _DAMAGED as e:
            raise runs.RunFileError(f"{label} is a damaged zip ({_why(e)})") from None
        try:
            runs_dir.mkdir(parents=True, exist_ok=True)
            runs.clean_leftovers(runs_dir)
            tmp = runs_dir / f".import-{secrets.token_hex(8)}.tmp"  # hidden: the listing skips it
            tmp.mkdir()
        except OSError as e:
            raise runs.RunFileError(f"cannot write into the runs folder: {_why(e)}") from None
        try:
            _extract(z, members, tmp)
            cfg = _check(tmp)
            try:
                wanted = runs.sanitize_name(name or top) if (name or top) else None
            except ConfigError:
                wanted = None
            target = runs.create_run_dir(runs_dir, cfg, wanted)  # reserves a free name (an empty folder) ...
            try:
                os.rename(tmp, target)  # ... that the unpacked run replaces in one step
            except OSError as e:
                target.rmdir()
                raise runs.RunFileError(f"could not move the imported run into place: {_why(e)}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
