"""Ready-made example runs, shipped as export zips in examples/ and made by the project's own CLI.

A class can open one with a click (the Runs tab imports it through Lab.import_zip, so it can be
explored, resumed and forked like any run) before anything has trained. Remake them with
`examples/make_examples.sh` (or `python -m vae_core.examples`), which runs `python -m vae_core train`
once per recipe below and exports each run. Checkpoints are shipped without the optimizer's state
(Adam's moments would triple their size); a resumed example starts Adam afresh from its weights.
Listing them needs no torch (zipfile and json only), so the first page can offer them at once.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# Small networks keep each zip under a megabyte (the MLP at 400 hidden units is 2.6 MB of float32).
COMMON = ("--arch", "mlp", "--hidden-dim", "128", "--lr", "0.003", "--seed", "0")


@dataclass(frozen=True)
class Recipe:
    name: str
    about: str  # what the example shows, for the page
    args: tuple[str, ...]  # `python -m vae_core train` arguments beyond COMMON


RECIPES: tuple[Recipe, ...] = (
    Recipe("sprites-z8-b1", "Sprites in 8 latents at β 1, as a first run trains (a smaller network): "
                            "the shapes come back.",
           ("--dataset", "sprites", "--latent-dim", "8", "--beta", "1", "--epochs", "10")),
    Recipe("sprites-z2-b1", "Sprites squeezed through 2 latents: five factors do not fit, so shapes blur "
                            "into blobs in the right place. Compare it with the 8-latent run.",
           ("--dataset", "sprites", "--latent-dim", "2", "--beta", "1", "--epochs", "10")),
    Recipe("fashion-z2-b1", "Fashion-MNIST in 2 latents: classes form regions of the latent map, and the "
                            "Evidence tab integrates the true log p(x) on a grid.",
           ("--dataset", "fashion-mnist", "--latent-dim", "2", "--beta", "1", "--epochs", "10")),
    Recipe("fashion-z16-b1", "Fashion-MNIST in 16 latents, β 1: sharper reconstructions, a higher ELBO.",
           ("--dataset", "fashion-mnist", "--latent-dim", "16", "--beta", "1", "--epochs", "10")),
    Recipe("fashion-z16-b4", "The same at β 4: blurrier, and fewer latent dimensions in use (Evidence tab).",
           ("--dataset", "fashion-mnist", "--latent-dim", "16", "--beta", "4", "--epochs", "10")),
)
SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")  # shown on the page; nothing a renderer could read as markup


def examples_dir() -> Path:
    """examples/ beside the package (a source checkout or `pip install -e .`), or $VAE_EXAMPLES_DIR."""
    return Path(os.environ.get("VAE_EXAMPLES_DIR") or Path(__file__).resolve().parents[1] / "examples")


@dataclass(frozen=True)
class Example:
    """One shipped example run: its zip and what its config says."""

    name: str
    path: Path
    about: str
    dataset: str
    latent_dim: int
    beta: float
    epochs: int
    local: bool  # its dataset is on this machine, so reconstructions and the scatter can be drawn
    size_bytes: int

    @property
    def note(self) -> str:
        """What opening it here will lack, and how to fix that; empty when its dataset is on this machine."""
        if self.local:
            return ""
        from .sources import _how_to_provide

        return (f"It was trained on {self.dataset}, which is not on this machine: its curves, numbers and prior "
                "samples show, but reconstructions, the latent scatter and the Evidence tab need the test images "
                "(downloaded when a tab asks, where the network allows). "
                f"To provide them: {_how_to_provide(self.dataset)}.")


def list_examples(folder: Path | None = None) -> list[Example]:
    """The example zips in `folder` (default examples_dir()), in recipe order; unreadable ones are skipped."""
    from .sources import find_local

    folder = Path(folder) if folder else examples_dir()
    order = {r.name: i for i, r in enumerate(RECIPES)}
    about = {r.name: r.about for r in RECIPES}
    out = []
    for path in sorted(folder.glob("*.zip")) if folder.is_dir() else []:
        if not SAFE_NAME.match(path.stem):
            continue
        try:
            with zipfile.ZipFile(path) as z:
                config_name = next(n for n in z.namelist() if n.endswith("/config.json") or n == "config.json")
                raw = json.loads(z.read(config_name))
            model, train = raw["model"], raw["train"]
            dataset = str(train["dataset"])
            ex = Example(path.stem, path, about.get(path.stem, "An example run."), dataset, int(model["latent_dim"]),
                         float(train["beta"]), int(train["epochs"]),
                         dataset == "sprites" or find_local(dataset) is not None, path.stat().st_size)
        except (OSError, KeyError, StopIteration, ValueError, TypeError, zipfile.BadZipFile):
            continue
        out.append(ex)
    return sorted(out, key=lambda e: (order.get(e.name, len(order)), e.name))


def commands(recipes: Sequence[Recipe] = RECIPES, extra: Sequence[str] = ()) -> list[list[str]]:
    """The `python -m vae_core train` argument lists that make the examples (extra appended to each)."""
    return [["train", *COMMON, *r.args, "--name", r.name, "--quiet", *extra] for r in recipes]


def make(out_dir: Path, *, extra: Sequence[str] = (), names: Sequence[str] | None = None) -> list[Path]:
    """Train every recipe with the CLI in a scratch runs folder and write out_dir/<name>.zip for each."""
    from . import runs
    from .cli import main as cli_main
    from .transfer import export_zip

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = [r for r in RECIPES if names is None or r.name in names]
    written = []
    with tempfile.TemporaryDirectory(prefix="vae-examples-") as tmp:
        for recipe, argv in zip(chosen, commands(chosen, extra)):
            print("python -m vae_core " + shlex.join(argv), flush=True)
            if cli_main([*argv, "--runs-dir", tmp]) != 0:
                raise SystemExit(f"making {recipe.name} failed")
            run_dir = Path(tmp) / recipe.name
            ckpt = runs.load_checkpoint(run_dir / runs.CHECKPOINT)
            ckpt.pop("optimizer", None)  # resume starts Adam afresh (RunMath loads it only when present)
            ckpt.pop("version", None)
            runs.save_checkpoint(run_dir, ckpt)
            # No time-lapse: ~30 snapshots of 0.4 MB would make every zip ~12 MB in the repository. The
            # Time-lapse tab says an example has none; resuming one records them from there on.
            shutil.rmtree(run_dir / "snapshots", ignore_errors=True)
            target = out_dir / f"{recipe.name}.zip"
            target.write_bytes(export_zip(run_dir))
            print(f"  -> {target} ({target.stat().st_size / 2**20:.2f} MB)", flush=True)
            written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vae_core.examples", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(examples_dir()), help="folder for the zips (default: examples/)")
    p.add_argument("--only", nargs="*", default=None, metavar="NAME", help="remake only these examples")
    p.add_argument("--print", action="store_true", help="print the CLI commands and exit")
    a, extra = p.parse_known_args(argv)  # anything else goes to every `train` (e.g. --epochs 1 --data-dir DIR)
    if a.print:
        for argv_ in commands(extra=extra):
            print("python -m vae_core " + shlex.join(argv_))
        return 0
    make(Path(a.out), extra=extra, names=a.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
