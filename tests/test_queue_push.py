"""A waiting session hears its queue place change and its run start from the server, over Streamlit's own
websocket protocol (benchmarks/class_ws.py: no browser), in order and without reloading its page."""
from __future__ import annotations

import sys
import urllib.parse

import pytest

from helpers import ROOT, poll_until, streamlit_server

pytestmark = pytest.mark.slow
sys.path.insert(0, str(ROOT / "benchmarks"))
class_ws = pytest.importorskip("class_ws")
from bench_class import classify  # noqa: E402


def test_a_waiting_session_sees_its_place_move_up_and_its_run_start(tmp_path):
    with streamlit_server(tmp_path, VAE_MAX_RUNS="1") as url:
        loop = class_ws.Loop()
        port = int(urllib.parse.urlparse(url).port)
        events: dict[int, list[tuple[str, str]]] = {i: [] for i in range(3)}
        pages = []
        try:
            for i in range(3):  # whichever Train the server takes first trains; the other two wait
                q = urllib.parse.urlencode({"sid": f"queue-push-{i}", "beta": 1 + i, "dataset": "sprites",
                                            "train_size": 512, "batch_size": 64, "hidden_dim": 64, "latent_dim": 2,
                                            "epochs": 15, "evidence_every": 0})
                session = class_ws.WsSession(port, q, classify, lambda t, k, place, text, i=i: events[i].append((k, place)),
                                             host="127.0.0.1")
                page = class_ws.WsPage(session, loop)
                page.load("btn_train", timeout=120)
                pages.append(page)
            for page in pages:
                page.click("btn_train")
            # Only the watch's own pushes can show these: the page is never reloaded or clicked again.
            poll_until(lambda: any(("queued", "2") in e for e in events.values()), what="a session to show place 2")
            poll_until(lambda: all(e and e[-1][0] == "finished" for e in events.values()), timeout=600,
                       what="every session to show its run finished")
        finally:
            for page in pages:
                page.close()
            loop.stop()
    last = next(e for e in events.values() if ("queued", "2") in e)  # the session whose Train came last
    assert [p for k, p in last if k == "queued"] == ["2", "1"], last  # it moved up while the first run trained
    assert last.index(("queued", "1")) < max(i for i, (k, _) in enumerate(last) if k in ("running", "finished"))
    assert ("", "") not in last[last.index(("queued", "2")):last.index(("queued", "1"))], last  # the line never blinks
