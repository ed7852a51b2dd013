"""The live panel component's files: built once, reused, and never half-built."""
from __future__ import annotations

from dashboard import live_panel


def test_component_folder_holds_the_page_and_plotly_and_is_reused(tmp_path):
    d = live_panel._component_dir(tmp_path / "cache")
    assert (d / "index.html").read_bytes() == (live_panel.HERE / "index.html").read_bytes()
    assert (d / "plotly.min.js").stat().st_size == live_panel.PLOTLY_JS.stat().st_size
    assert 'src="plotly.min.js"' in (d / "index.html").read_text()  # the page loads the copy beside it
    stamp = (d / "plotly.min.js").stat().st_mtime_ns
    assert live_panel._component_dir(tmp_path / "cache") == d
    assert (d / "plotly.min.js").stat().st_mtime_ns == stamp  # reused, not copied again
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [d.name]  # no build folders left behind


def test_unwritable_cache_falls_back_to_a_private_copy(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # mkdir under a file fails, as an unwritable shared folder would
    d = live_panel._component_dir(blocked / "cache")
    assert (d / "index.html").is_file() and (d / "plotly.min.js").is_file()
    assert blocked not in d.parents
