"""The core stays UI-free: importing every vae_core module never imports streamlit."""
import pkgutil
import subprocess
import sys
from pathlib import Path

import vae_core


def test_vae_core_never_imports_streamlit():
    mods = [m.name for m in pkgutil.iter_modules(vae_core.__path__) if m.name != "__main__"]
    code = "import sys\n" + "".join(f"import vae_core.{m}\n" for m in mods) + \
           "bad = [m for m in sys.modules if m == 'streamlit' or m.startswith('streamlit.')]\nprint(bad)\nassert not bad\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(vae_core.__file__).parents[1])
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(mods) >= 8
    for path in Path(vae_core.__file__).parent.glob("*.py"):
        assert "import streamlit" not in path.read_text(), path
