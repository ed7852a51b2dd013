"""The boundaries between the core and the UI hold.

vae_core never imports streamlit; the dashboard never imports torch. The dashboard reads the
core only through vae_core.lab and the pure-numpy helpers (images, latent, config), so its first
page draws while torch loads in the background and a reader can never reach a live model.
"""
import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import vae_core

ROOT = Path(vae_core.__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboard"
ALLOWED_CORE = {"vae_core.lab", "vae_core.images", "vae_core.latent", "vae_core.config"}


def test_vae_core_never_imports_streamlit():
    mods = [m.name for m in pkgutil.iter_modules(vae_core.__path__) if m.name != "__main__"]
    code = "import sys\n" + "".join(f"import vae_core.{m}\n" for m in mods) + \
           "bad = [m for m in sys.modules if m == 'streamlit' or m.startswith('streamlit.')]\nprint(bad)\nassert not bad\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(mods) >= 8
    for path in Path(vae_core.__file__).parent.glob("*.py"):
        assert "import streamlit" not in path.read_text(), path


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in a module, anywhere in it (functions, TYPE_CHECKING blocks too)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "vae_core":
            out += [(node.lineno, f"vae_core.{a.name}") for a in node.names]  # from vae_core import latent
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def dashboard_modules() -> list[str]:
    """Every importable dashboard module: state, common, settings and every panel (the app script aside)."""
    names = [f"dashboard.{m.name}" for m in pkgutil.iter_modules([str(DASHBOARD)]) if not m.ispkg and m.name != "app"]
    names += [f"dashboard.panels.{m.name}" for m in pkgutil.iter_modules([str(DASHBOARD / "panels")])]
    return sorted(names)


def test_dashboard_source_imports_no_torch_and_only_the_lab_side_of_the_core():
    files = sorted(DASHBOARD.rglob("*.py"))
    assert len(files) >= 10
    bad = []
    for path in files:
        for line, module in _imported(ast.parse(path.read_text(), str(path))):
            top = module.split(".")[0]
            if top == "torch" or (top == "vae_core" and module != "vae_core" and module not in ALLOWED_CORE):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
            if module == "vae_core":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the vae_core package itself; name a module")
    assert not bad, "\n".join(bad)


def test_importing_every_dashboard_module_leaves_torch_unloaded():
    mods = dashboard_modules()
    assert {"dashboard.state", "dashboard.common", "dashboard.settings", "dashboard.panels.explore",
            "dashboard.panels.evidence", "dashboard.panels.runs"} <= set(mods)
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods)
            + "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
              "core = sorted(m for m in sys.modules if m.startswith('vae_core.'))\n"
              "print(loaded[:5], core)\nassert not loaded\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


# A tab's module draws its own sections; sections share the tab's reading helpers (evidence_series),
# never another panel. Anything two tabs share lives in dashboard/common.py.
SECTIONS = {"evidence": {"evidence_bounds", "evidence_kl", "evidence_posterior", "evidence_series"},
            "evidence_bounds": {"evidence_series"}, "evidence_kl": {"evidence_series"},
            "evidence_posterior": {"evidence_series"}, "runs": {"run_actions", "compare"},
            "sweeps": {"compare"}}  # the sweep's runs on Compare's rate–distortion chart


def test_panels_never_import_other_panels():
    bad = []
    for path in sorted((DASHBOARD / "panels").glob("*.py")):
        allowed = SECTIONS.get(path.stem, set())
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module == "dashboard.panels":
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dashboard.panels."):
                names = [node.module.split(".")[2]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[2] for a in node.names if a.name.startswith("dashboard.panels.")]
            bad += [f"{path.name}:{node.lineno} imports panel {n}" for n in names if n not in allowed]
    assert not bad, "\n".join(bad)
