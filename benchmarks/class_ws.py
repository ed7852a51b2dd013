"""Dashboard sessions without a browser: Streamlit's own websocket protocol, spoken from Python.

bench_class.py --clients websocket drives its N sessions with these instead of Chromium pages, so the
numbers are the server's alone: 20 Chromium pages on the server's own 2 cores took ~1.5 of them
(`CPU meanwhile` in its table), while in a class each browser runs on its student's machine.

A WsSession does what the page's JavaScript does with the server and no more: it connects to
/_stcore/stream, asks for a script run with the page's query string, keeps the elements each run sends
(by delta path), drops those a full run did not send again when it finishes, reruns fragments that ask
for it (auto_rerun: every `interval` seconds, as the browser's timer does) and presses a button by
sending its trigger. What a person would see in the status line is read from the main area's alerts,
captions and progress texts, and from the live panel's `status` argument, as the browser benchmark's
observer reads them from the page.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Callable

import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState

FULL_RUN_DONE = ForwardMsg.ScriptFinishedStatus.Value("FINISHED_SUCCESSFULLY")


class WsSession:
    """One dashboard session over the websocket; `report(t, kind, place, text)` hears each change of status."""

    def __init__(self, port: int, query: str, classify: Callable[[str], tuple[str, str]],
                 report: Callable[[float, str, str, str], None], host: str = "localhost") -> None:
        self.url, self.origin = f"ws://{host}:{port}/_stcore/stream", f"http://{host}:{port}"
        self.query, self.classify, self.report = query.lstrip("?"), classify, report
        self.elements: dict[tuple[int, ...], tuple[str, str]] = {}  # delta path -> (element type, text)
        self.fresh: set[tuple[int, ...]] = set()  # paths sent since the current full run started
        self.buttons: dict[str, str] = {}  # button key (the end of its id) -> widget id
        self.page_hash = ""
        self.timers: dict[str, asyncio.Task[None]] = {}
        self.finished = asyncio.Event()  # a full run finished (reset when one starts)
        self.last = None
        self.ws: Any = None

    async def connect(self) -> None:
        self.ws = await websockets.connect(self.url, subprotocols=["streamlit"], origin=self.origin,
                                           max_size=None, ping_interval=None)
        asyncio.get_running_loop().create_task(self._receive())
        await self.rerun()

    async def rerun(self, trigger: str | None = None, fragment_id: str | None = None) -> None:
        msg = BackMsg()
        cs = msg.rerun_script
        cs.query_string, cs.page_script_hash = self.query, self.page_hash
        if trigger is not None:
            cs.widget_states.widgets.append(WidgetState(id=trigger, trigger_value=True))
        if fragment_id is not None:
            cs.fragment_id, cs.is_auto_rerun = fragment_id, True
        else:  # a full run registers its fragments' timers anew, as the page's do
            self.finished.clear()
            for t in self.timers.values():
                t.cancel()
            self.timers.clear()
        await self.ws.send(msg.SerializeToString())

    async def click(self, key: str) -> None:
        await self.rerun(trigger=self.buttons[key])

    async def close(self) -> None:
        for t in self.timers.values():
            t.cancel()
        if self.ws is not None:
            await self.ws.close()

    # ------------------------------------------------------------ what the server sends

    async def _receive(self) -> None:
        try:
            async for data in self.ws:
                msg = ForwardMsg()
                msg.ParseFromString(data)
                self._handle(msg)
        except websockets.ConnectionClosed:
            pass

    def _handle(self, msg: ForwardMsg) -> None:
        kind = msg.WhichOneof("type")
        if kind == "new_session":
            self.page_hash = msg.new_session.page_script_hash or self.page_hash
        elif kind == "delta":
            self._delta(tuple(msg.metadata.delta_path), msg.delta)
        elif kind == "script_finished":
            if msg.script_finished == FULL_RUN_DONE:
                for path in set(self.elements) - self.fresh:
                    del self.elements[path]
                self.fresh = set()
                self.finished.set()
                self._look()
        elif kind == "auto_rerun":
            self._every(msg.auto_rerun.fragment_id, msg.auto_rerun.interval)
        elif kind == "stop_auto_rerun":
            t = self.timers.pop(msg.stop_auto_rerun.fragment_id, None)
            if t is not None:
                t.cancel()

    def _delta(self, path: tuple[int, ...], delta: Any) -> None:
        self.fresh.add(path)
        if delta.WhichOneof("type") != "new_element":
            return
        for old in [p for p in self.elements if p[:len(path)] == path and len(p) > len(path)]:
            del self.elements[old]  # an element where a block was (st.empty over a container): its children go
        el = delta.new_element
        what = el.WhichOneof("type")
        text = ""
        if what == "alert":
            text = el.alert.body
        elif what == "markdown" and el.markdown.element_type == el.markdown.CAPTION:
            text = el.markdown.body
        elif what == "progress":
            text = el.progress.text
        elif what == "button":
            self.buttons[el.button.id.rsplit("-", 1)[-1]] = el.button.id
        elif what == "component_instance":
            try:
                status = json.loads(el.component_instance.json_args).get("status") or {}
                text = str(status.get("text") or "") if isinstance(status, dict) else ""
            except ValueError:
                text = ""
        main = path[:1] == (0,)  # the main area, not the sidebar
        self.elements[path] = (what, text if main else "")
        self._look()

    def _look(self) -> None:
        text = " ".join(t for _, t in self.elements.values() if t)
        kind, place = self.classify(text)
        if (kind, place) != self.last:
            self.last = (kind, place)
            self.report(time.time(), kind, place, text.strip()[:160])

    def _every(self, fragment_id: str, interval: float) -> None:
        old = self.timers.pop(fragment_id, None)
        if old is not None:
            old.cancel()

        async def tick() -> None:
            while True:
                await asyncio.sleep(interval)
                await self.rerun(fragment_id=fragment_id)

        self.timers[fragment_id] = asyncio.get_running_loop().create_task(tick())


class Loop:
    """An asyncio loop in a thread, for calling WsSession from the benchmark's plain code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ws-clients", daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class WsPage:
    """A WsSession behind the few calls bench_class.py makes on a page."""

    def __init__(self, session: WsSession, loop: Loop) -> None:
        self.session, self.loop = session, loop

    def load(self, button: str, timeout: float) -> None:
        """Connect, and return once the first full run has finished and drawn `button`."""
        async def loaded() -> None:
            await self.session.connect()
            while not (self.session.finished.is_set() and button in self.session.buttons):
                await asyncio.sleep(0.05)
        self.loop.call(asyncio.wait_for(loaded(), timeout), timeout + 5)

    def click(self, button: str) -> None:
        self.loop.call(self.session.click(button))

    def wait_for_timeout(self, ms: float) -> None:
        time.sleep(ms / 1000)

    def close(self) -> None:
        try:
            self.loop.call(self.session.close(), 10)
        except Exception:  # noqa: BLE001  (closing a connection the server already dropped)
            pass
