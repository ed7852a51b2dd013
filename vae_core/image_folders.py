"""Finding the images of a folder dataset without decoding them: listing, shape and a description. No torch.

The dashboard describes a folder (how many images, labels, sizes) before anyone trains, and must
not wait for torch to do so; folder_data.py decodes what this lists.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import FOLDER_PREFIX
from .records import DatasetUnavailable

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MIN_SIDE = 8  # an image smaller than this on either side has too little to resize from
DEFAULT_SIZE = 64  # the image size when the folder's images are not all one square size
SIZE_RANGE = (16, 128)
TEST_FRACTION, TEST_MAX = 0.1, 1000  # held out: a fixed 10% of the images, at most 1,000
NO_LABEL = "(no label)"
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def folder_path(name: str) -> Path:
    """The folder named by a dataset name "folder:PATH"."""
    return Path(os.path.expanduser(name[len(FOLDER_PREFIX):].strip()))


def is_folder(name: str) -> bool:
    return isinstance(name, str) and name.startswith(FOLDER_PREFIX)


@dataclass(frozen=True)
class Listing:
    """What a folder holds before decoding: candidate files with labels, and files already known bad."""

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    bad: tuple[tuple[str, str], ...]  # (file relative to root, why)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):  # outside, unreadable, or a symlink loop
        return False


def _walk(top: Path, root: Path, bad: list[tuple[str, str]]) -> list[Path]:
    """Candidate image files under top, sorted; links leading out of root are listed as bad, never read."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):  # symlinked folders are not descended into
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for n in list(dirnames):
            if (d / n).is_symlink():
                dirnames.remove(n)
                if not _inside(d / n, root):
                    bad.append((str((d / n).relative_to(root)), "a link to a folder outside the dataset folder"))
        for n in sorted(filenames):
            if n.startswith("."):
                continue
            p = d / n
            rel = str(p.relative_to(root))
            if p.is_symlink() and not _inside(p, root):
                bad.append((rel, "a link to a file outside the dataset folder"))
            elif p.suffix.lower() not in EXTENSIONS:
                bad.append((rel, "not an image (PNG, JPEG or WebP)"))
            else:
                found.append(p)
    return found


def list_folder(path: str | Path) -> Listing:
    """Candidate files in ImageFolder layout: sub-folders holding images are labels; else one flat set."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetUnavailable(f"no folder at {root}")
    root = root.resolve()
    bad: list[tuple[str, str]] = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and not p.is_symlink())
    if subdirs:  # torchvision's ImageFolder: one label per sub-folder, files at the top level are not used
        files, labels, names = [], [], []
        for d in subdirs:
            found = _walk(d, root, bad)
            if found:
                labels += [len(names)] * len(found)
                names.append(d.name)
                files += found
        for p in sorted(root.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS:
                bad.append((p.name, "at the top of a folder with label sub-folders (ImageFolder layout)"))
        return Listing(root, tuple(files), tuple(labels), tuple(names), tuple(bad))
    files = _walk(root, root, bad)
    return Listing(root, tuple(files), (0,) * len(files), (NO_LABEL,), tuple(bad))


def probe_shape(listing: Listing, channels: int | None, size: int | None) -> tuple[int, int]:
    """The run's (channels, size): as asked, else from the images' headers (colour if any is; one square size or 64)."""
    from PIL import Image

    if channels is not None and size is not None:
        return channels, size
    colour, sizes = False, set()
    for p in listing.files:
        try:
            with Image.open(p) as img:  # the header only: no pixels are decoded
                colour = colour or img.mode not in GREY_MODES
                sizes.add(img.size)
        except Exception:  # a bad file is skipped later with its reason; it has no say in the shape
            continue
    if size is None:
        only = next(iter(sizes)) if len(sizes) == 1 else None
        size = min(max(only[0], SIZE_RANGE[0]), SIZE_RANGE[1]) if only and only[0] == only[1] else DEFAULT_SIZE
    return (3 if colour else 1) if channels is None else channels, size




DESCRIBE_SAMPLE = 2000  # headers read to describe a folder: sizes and colour from the first this many files


def describe(name: str) -> str:
    """One line for a picker: how many images in which labels, their sizes, the shape a run trains at.

    Reads file headers only (no pixels); raises DatasetUnavailable for a folder with no candidate image.
    """
    from PIL import Image

    listing = list_folder(folder_path(name))
    if not listing.files:
        raise DatasetUnavailable(f"no PNG, JPEG or WebP image in folder {listing.root.name!r}")
    sample = Listing(listing.root, listing.files[:DESCRIBE_SAMPLE], listing.labels[:DESCRIBE_SAMPLE],
                     listing.label_names, ())
    channels, size = probe_shape(sample, None, None)
    sizes = []
    for p in sample.files:
        try:
            with Image.open(p) as img:
                sizes.append(img.size)
        except Exception:
            continue
    n = len(listing.files)
    labels = "no labels (a flat folder)" if listing.label_names == (NO_LABEL,) else \
        f"{len(listing.label_names)} labels ({', '.join(listing.label_names[:5])}{', …' if len(listing.label_names) > 5 else ''})"
    if sizes:
        small, large = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
        size_text = f"{small[0]}×{small[1]}" if small == large else f"{small[0]}×{small[1]} to {large[0]}×{large[1]}"
    else:
        size_text = "no readable image header"
    sampled = f" (sizes from the first {DESCRIBE_SAMPLE:,})" if n > DESCRIBE_SAMPLE else ""
    skipped = f"; {len(listing.bad)} other files will be skipped" if listing.bad else ""
    return (f"folder {listing.root.name!r}: {n:,} image files, {labels}; {size_text}{sampled}, "
            f"{'colour' if channels == 3 else 'grey'} → trains at {channels}×{size}×{size} unless set{skipped}")


# ------------------------------------------------------------------ an uploaded zip of images

ZIP_MAX_BYTES = 200 * 2**20  # the upload itself
ZIP_MAX_EXTRACTED = 2 * 2**30  # what it may unpack to (a zip bomb stops here)
ZIP_MAX_FILES = 200_000


def extract_zip(data: bytes, dest_root: Path) -> Path:
    """Unpack the image files of a zip into a new folder under dest_root, safely; returns that folder.

    Only PNG, JPEG and WebP members are written, each under the folder (no absolute paths, no '..',
    no links), within size and count limits. The folder is named by the zip's hash, so the same
    upload lands in the same place (and its decoded cache is reused); it appears whole or not at all.
    """
    import hashlib
    import io
    import shutil
    import stat
    import tempfile
    import zipfile

    if len(data) > ZIP_MAX_BYTES:
        raise DatasetUnavailable(f"the zip is {len(data) / 2**20:.0f} MB; the limit is {ZIP_MAX_BYTES // 2**20} MB "
                                 "(for more, copy the folder to the server and give its path)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise DatasetUnavailable("the upload is not a readable zip file") from None
    if len(members) > ZIP_MAX_FILES:
        raise DatasetUnavailable(f"the zip holds {len(members):,} entries; the limit is {ZIP_MAX_FILES:,}")
    wanted = []
    total = 0
    for m in members:
        parts = Path(m.filename.replace("\\", "/")).parts
        is_link = stat.S_ISLNK(m.external_attr >> 16)
        if m.is_dir() or is_link or not parts or m.filename.startswith(("/", "\\")) or ".." in parts \
                or ":" in parts[0] or any(p.startswith(".") for p in parts) or parts[0] == "__MACOSX":
            continue
        if Path(parts[-1]).suffix.lower() not in EXTENSIONS:
            continue
        total += m.file_size
        if total > ZIP_MAX_EXTRACTED:
            raise DatasetUnavailable(f"the zip unpacks to more than {ZIP_MAX_EXTRACTED // 2**30} GB")
        wanted.append((m, Path(*parts)))
    if not wanted:
        raise DatasetUnavailable("the zip holds no PNG, JPEG or WebP image")
    # One top folder holding everything (a zipped folder) is the dataset folder itself.
    tops = {rel.parts[0] for _, rel in wanted}
    if len(tops) == 1 and all(len(rel.parts) > 1 for _, rel in wanted):
        wanted = [(m, Path(*rel.parts[1:])) for m, rel in wanted]
    dest_root = Path(dest_root)
    final = dest_root / f"upload-{hashlib.sha256(data).hexdigest()[:16]}"
    if final.is_dir():
        return final
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=dest_root))
    try:
        for m, rel in wanted:
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        try:
            os.rename(tmp, final)
        except OSError:  # the same upload, unpacked at the same moment by another session
            shutil.rmtree(tmp, ignore_errors=True)
        return final
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetUnavailable(f"the zip could not be unpacked ({type(e).__name__})") from None
