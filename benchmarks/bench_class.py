"""A class on one server: N browser sessions each press Train with their own β.

Starts `streamlit run dashboard/app.py` on a free port over a fresh runs directory (VAE_RUNS_DIR),
opens N Playwright browser contexts (separate sessions, each with its own `sid` URL parameter)
in one headless Chromium, each on a URL with its own β (spread geometrically over 0.25..8) and
tiny settings (sprites, 512 training images, batch 64, hidden 64, latent 2, 2 epochs, no evidence
estimates), loads them all, then presses Train in all of them within about a second. The server's
Lab trains VAE_MAX_RUNS at once (default: one per 2 cores) and queues the rest. Until every run has ended:

* every --sample-every seconds, the server's RSS (its process and children; psutil when installed,
  else /proc) is sampled;
* a thread reads each run's status.json every 50 ms (when it changed): a run leaves the queue when
  its state first stops being "queued" (the time taken is the `heartbeat` of that status write, i.e.
  when it was written, not when it was read); runs must end "finished", never "stopped"/"failed"/
  "interrupted";
* in every page an init script (in each frame: a MutationObserver, and a 100 ms look in the live
  panel's iframe, where the observer stays silent) reports, with the browser's clock (the same
  machine's clock), each change of what the status line shows: waiting in the queue, running, finished.

The page refresh latency of a waiting session is the time from its run leaving the queue on disk
to its page no longer showing the waiting message: how long a student looks at a stale "Waiting
for a free slot" while their run already trains (or has already finished). Goal: at most
--goal-latency (2 s) for every waiting session. The same latency for "Finished" is reported too.

    python benchmarks/bench_class.py [--sessions 20] [--max-runs K] [--deadline 1800]
    python benchmarks/bench_class.py --sessions 3          # quick check
    python benchmarks/bench_class.py --clients websocket   # the server alone: sessions without browsers

With --clients websocket the sessions are Python clients of Streamlit's websocket protocol
(benchmarks/class_ws.py) instead of Chromium pages: what the server sends them, without 20 browsers
sharing its cores (a class's browsers run on the students' machines). The table's "CPU meanwhile" row
says how the machine was shared.

Prints a table and exits 1 when a goal failed (or 2 when the benchmark could not run).
Needs playwright and /usr/bin/chromium. Heavy on a 2-core machine: run nothing else beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_dashboard import free_port  # noqa: E402  (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
TRAIN = ".st-key-btn_train button[data-testid^=\"stBaseButton\"]:visible"
QUEUED_RE = r"waiting for a free slot|\bqueued\b[.:]"
BAD_STATES = ("stopped", "failed", "interrupted")

# Installed in every frame of every page before its scripts run. It reports (with Date.now()) each
# change of the status line's kind: in the live panel's iframe its #status section, in the main page
# the alerts and captions of the main area (the status line of the tabs other than Training).
OBSERVER_JS = r"""
(() => {
  const QUEUED = new RegExp(%(queued)s, 'i');
  const isTop = window === window.top;
  let last = null, scheduled = false;
  function shown() {
    if (!isTop) {
      const s = document.getElementById('status');
      if (!s || s.hidden) return '';
      const m = document.getElementById('message');
      return (m ? m.textContent : s.textContent) || '';
    }
    const main = document.querySelector('[data-testid="stMain"]');
    if (!main) return '';
    let out = '';
    for (const el of main.querySelectorAll('[data-testid="stAlert"], [data-testid="stCaptionContainer"]'))
      out += ' ' + el.textContent;
    return out;
  }
  function kind(text) {
    if (!text.trim()) return '';
    if (QUEUED.test(text)) return 'queued';
    if (/\bFinished\b/.test(text)) return 'finished';
    if (/\bStopped\b/.test(text)) return 'stopped';
    if (/Training failed|\bInterrupted\b/.test(text)) return 'failed';
    if (/\u25B6|\bPaused\b/.test(text)) return 'running';
    return 'other';
  }
  function check() {
    scheduled = false;
    const text = shown();
    const k = kind(text);
    const place = (QUEUED.test(text) && /place (\d+)/i.exec(text)) ? /place (\d+)/i.exec(text)[1] : '';
    const key = k + '|' + place;
    if (key === last) return;
    if (typeof window.__benchReport !== 'function') { setTimeout(check, 100); return; }
    last = key;
    window.__benchReport(Date.now() / 1000, isTop ? 'top' : 'frame', k, place, text.trim().slice(0, 160));
  }
  new MutationObserver(() => { if (!scheduled) { scheduled = true; setTimeout(check, 30); } })
    .observe(document, {childList: true, subtree: true, characterData: true, attributes: true,
                        attributeFilter: ['hidden']});
  // The observer above stays silent in the component's iframe (the init script runs there before
  // the frame's document settles), so frames also look every 100 ms: a few microseconds each.
  setInterval(() => { if (!scheduled) check(); }, 100);
  check();
})();
"""


def classify(text: str) -> tuple[str, str]:
    """The observer's kind() in Python (for websocket clients): what the status line says, and the queue place."""
    import re

    if not text.strip():
        return "", ""
    if re.search(QUEUED_RE, text, re.I):
        m = re.search(r"place (\d+)", text, re.I)
        return "queued", m.group(1) if m else ""
    for kind, pattern in (("finished", r"\bFinished\b"), ("stopped", r"\bStopped\b"),
                          ("failed", r"Training failed|\bInterrupted\b"), ("running", r"\u25B6|\bPaused\b")):
        if re.search(pattern, text):
            return kind, ""
    return "other", ""


@dataclass
class Session:
    index: int
    sid: str
    beta: float
    url: str
    page: Any = None
    loaded_s: float = math.nan
    clicked: float = math.nan
    visibility: str = ""
    events: list[tuple[float, str, str, str, str]] = field(default_factory=list)  # (t, where, kind, place, text)


@dataclass
class Run:
    path: Path
    owner: str | None = None
    beta: float | None = None
    first_seen: float = math.nan
    seen_queued: bool = False
    last_queued: float = math.nan  # when status.json last said "queued"
    left_queue: float = math.nan  # heartbeat of the first non-queued status
    imprecise: bool = False  # its first non-queued write was not seen: left_queue is the last queued look
    ended: float = math.nan  # heartbeat of the terminal status
    state: str = ""
    message: str = ""


# ------------------------------------------------------------------ server and its memory

def start_server(runs_dir: Path, max_runs: int | None, log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "VAE_RUNS_DIR": str(runs_dir)}
    env.pop("VAE_MAX_RUNS", None)
    if max_runs:
        env["VAE_MAX_RUNS"] = str(max_runs)
    log = open(log_path, "wb")
    srv = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless", "true",
                            "--server.port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if srv.poll() is not None:
            raise RuntimeError(f"the server exited with {srv.returncode}; see {log_path}")
        try:
            if urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2).read() == b"ok":
                return srv, port
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(srv)
    raise RuntimeError("the server did not answer /_stcore/health within 120 s")


def stop_server(srv: subprocess.Popen) -> None:
    if srv.poll() is not None:
        return
    try:
        os.killpg(srv.pid, signal.SIGTERM)
        srv.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(srv.pid, signal.SIGKILL)
        srv.wait(10)
    except ProcessLookupError:
        pass


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    return children


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants, MB."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            p = psutil.Process(pid)
            procs = [p] + p.children(recursive=True)
            total = 0
            for q in procs:
                try:
                    total += q.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            return total / 2**20
        except psutil.NoSuchProcess:
            return math.nan
    children, todo, total = _proc_children(), [pid], 0.0
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
                        break
        except OSError:
            pass
    return total


def cpu_seconds(pid: int | None = None, comm: str | None = None) -> float:
    """CPU time (user + system) used so far by `pid` and its descendants, or by every process whose name
    contains `comm` (the browser's), in seconds; from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    children = _proc_children()
    if pid is not None:
        todo, pids = [pid], []
        while todo:
            p = todo.pop()
            pids.append(p)
            todo += children.get(p, [])
    else:
        pids = [p for ps in children.values() for p in ps]
    total = 0.0
    for p in pids:
        try:
            if comm is not None:
                with open(f"/proc/{p}/comm") as f:
                    if comm not in f.read():
                        continue
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


# ------------------------------------------------------------------ runs on disk

def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _find(d: Any, key: str) -> Any:
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


class RunWatcher(threading.Thread):
    """Reads the runs' status.json every 50 ms (only files whose mtime changed) in its own thread.

    A tiny run trains for under a second, so the main thread (busy clicking in pages) cannot watch
    the files itself. A run leaves the queue at the `heartbeat` of its first non-queued status
    write (the time it was written); if that write was missed (already overwritten by a later one
    when read), the last time it was seen queued is used instead (`imprecise`), which can only
    overstate the page's latency.
    """

    def __init__(self, runs_dir: Path, period: float = 0.05) -> None:
        super().__init__(name="bench-run-watcher", daemon=True)
        self.runs_dir, self.period = runs_dir, period
        self.runs: dict[str, Run] = {}
        self._seen: dict[str, int] = {}
        self._halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.poll()
            except OSError:
                pass
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.poll()

    def snapshot(self) -> list[Run]:
        with self.lock:
            return [dataclasses.replace(r) for r in self.runs.values()]

    def poll(self) -> None:
        if not self.runs_dir.is_dir():
            return
        now = time.time()
        for d in self.runs_dir.iterdir():
            with self.lock:
                r = self.runs.get(d.name)
                if r is None:
                    if not d.is_dir():
                        continue
                    r = self.runs[d.name] = Run(d, first_seen=now)
                if r.owner is None:
                    cfg = _read_json(d / "config.json")
                    if cfg:
                        r.owner = cfg.get("owner")
                        beta = _find(cfg, "beta")
                        r.beta = float(beta) if isinstance(beta, (int, float)) else None
                if not math.isnan(r.ended):
                    continue
                try:
                    mtime = (d / "status.json").stat().st_mtime_ns
                except OSError:
                    continue
                if self._seen.get(d.name) == mtime:
                    if r.state == "queued":
                        r.last_queued = now
                    continue
                st = _read_json(d / "status.json")
                state = st.get("state")
                if not state:
                    continue
                self._seen[d.name] = mtime
                r.state, r.message = state, str(st.get("message", ""))
                beat = st.get("heartbeat") if isinstance(st.get("heartbeat"), (int, float)) else now
                if state == "queued":
                    r.seen_queued, r.last_queued = True, now
                elif math.isnan(r.left_queue):
                    if state in ("finished",) + BAD_STATES:  # its "running" write was overwritten unseen
                        r.imprecise = True
                        r.left_queue = r.last_queued if not math.isnan(r.last_queued) else r.first_seen
                    else:
                        r.left_queue = beat
                if state in ("finished",) + BAD_STATES:
                    r.ended = beat


# ------------------------------------------------------------------ what the pages showed

def page_leaves(events: list[tuple[float, str, str, str, str]], kind: str) -> tuple[bool, float]:
    """(whether the page ever showed `kind`, when it last stopped showing it: nan if it still does)."""
    current: dict[str, str] = {}
    ever, left, showing = False, math.nan, False
    for t, where, k, _place, _text in sorted(events):
        current[where] = k
        now = kind in current.values()
        if now:
            ever, left = True, math.nan
        elif showing:
            left = t
        showing = now
    return ever, (math.nan if showing else left)


def page_first(events: list[tuple[float, str, str, str, str]], kinds: tuple[str, ...]) -> float:
    return min((t for t, _w, k, _p, _x in events if k in kinds), default=math.nan)


def fmt(x: float, unit: str = "s", digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f} {unit}".strip()


# ------------------------------------------------------------------ the benchmark

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--max-runs", type=int, default=None, help="VAE_MAX_RUNS for the server (default: unset)")
    ap.add_argument("--deadline", type=float, default=1800, help="seconds from the first Train to give up")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden-dim", type=int, default=64)
    ap.add_argument("--latent-dim", type=int, default=2)
    ap.add_argument("--beta-min", type=float, default=0.25)
    ap.add_argument("--beta-max", type=float, default=8.0)
    ap.add_argument("--sample-every", type=float, default=2.0, help="seconds between server RSS samples")
    ap.add_argument("--goal-latency", type=float, default=2.0, help="max page refresh latency for waiting sessions, s")
    ap.add_argument("--max-rss-mb", type=float, default=2048, help="goal: the server's peak RSS, MB")
    ap.add_argument("--grace", type=float, default=60, help="seconds the pages get to show the end after the runs end")
    ap.add_argument("--keep", action="store_true", help="keep the runs directory and the server log")
    ap.add_argument("--clients", choices=("browser", "websocket"), default="browser",
                    help="browser: N Chromium pages on this machine; websocket: N sessions speaking Streamlit's "
                         "protocol from Python (benchmarks/class_ws.py), i.e. the server alone")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw timings (page reports, runs, RSS) here")
    args = ap.parse_args()

    websocket = args.clients == "websocket"
    if websocket:
        from class_ws import Loop, WsPage, WsSession
    else:
        from playwright.sync_api import sync_playwright

    n = max(1, args.sessions)
    tmp = Path(tempfile.mkdtemp(prefix="bench-class-"))
    runs_dir, log_path = tmp / "runs", tmp / "server.log"
    ratio = args.beta_max / args.beta_min
    betas = [round(args.beta_min * ratio ** (i / (n - 1)), 2) if n > 1 else 1.0 for i in range(n)]
    sessions = []
    for i, beta in enumerate(betas):
        sid = f"bench{i:02d}{secrets.token_hex(6)}"
        q = {"sid": sid, "beta": f"{beta:g}", "train_size": args.train_size, "batch_size": args.batch_size,
             "hidden_dim": args.hidden_dim, "latent_dim": args.latent_dim, "epochs": args.epochs,
             "evidence_every": 0, "dataset": "sprites"}
        sessions.append(Session(i, sid, beta, "/?" + urllib.parse.urlencode(q)))
    by_sid = {s.sid: s for s in sessions}

    print(f"{n} sessions, β {', '.join(f'{b:g}' for b in betas)}; VAE_MAX_RUNS={args.max_runs or 'unset'}; "
          f"runs in {runs_dir}", flush=True)
    t_start = time.time()
    load_before = os.getloadavg()
    srv, port = start_server(runs_dir, args.max_runs, log_path)
    rss: list[tuple[float, float]] = [(time.time(), rss_mb(srv.pid))]
    rss_idle = rss[0][1]
    print(f"server up on port {port} in {time.time() - t_start:.1f} s, RSS {rss_idle:.0f} MB", flush=True)
    watcher = RunWatcher(runs_dir)
    watcher.start()
    known: dict[str, Run] = {}
    problems: list[str] = []
    deadline_hit = False
    code = 0
    pw = browser = ws_loop = None
    try:
        if websocket:
            ws_loop = Loop()
        else:
            pw = sync_playwright().start()
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=BROWSER_ARGS)
        script = OBSERVER_JS % {"queued": json.dumps(QUEUED_RE)}

        def load_ws(s: Session) -> None:
            t0 = time.time()
            session = WsSession(port, s.url.split("?", 1)[1], classify,
                                lambda t, k, place, text, s=s: s.events.append((t, "top", k, place, text)))
            s.page = WsPage(session, ws_loop)
            s.page.load("btn_train", timeout=120)
            s.loaded_s = time.time() - t0
            s.visibility = "websocket"

        def load(s: Session) -> None:
            ctx = browser.new_context(viewport={"width": 1280, "height": 900})
            ctx.expose_binding("__benchReport", lambda src, t, where, k, place, text, s=s:
                               s.events.append((float(t), where, k, place, text)))
            ctx.add_init_script(script)
            s.page = ctx.new_page()
            t0 = time.time()
            s.page.goto(f"http://localhost:{port}{s.url}", timeout=120_000)
            s.page.wait_for_selector(IDLE, timeout=120_000)
            s.page.locator(TRAIN).first.wait_for(state="visible", timeout=120_000)
            end = time.monotonic() + 60
            while not s.page.locator(TRAIN).first.is_enabled() and time.monotonic() < end:
                s.page.wait_for_timeout(200)
            s.loaded_s = time.time() - t0
            s.visibility = s.page.evaluate("document.visibilityState")

        for s in sessions:
            try:
                (load_ws if websocket else load)(s)
            except Exception as e:  # noqa: BLE001  (a page that does not load is a finding, not a crash)
                problems.append(f"session {s.index}: page did not load: {type(e).__name__}: {str(e)[:200]}")
            print(f"  session {s.index:2d} (β {s.beta:g}) loaded in {fmt(s.loaded_s)}", flush=True)
        rss.append((time.time(), rss_mb(srv.pid)))
        rss_loaded = rss[-1][1]
        if not any(s.page for s in sessions):
            raise RuntimeError("no page loaded")

        # Everyone presses Train at about the same moment: the buttons are found first, then clicked from
        # JavaScript one page after another (a round trip each; Playwright's own click waits for each
        # page to settle, which took ~0.8 s a page with 20 pages open and spread the class over 16 s).
        buttons = {}
        for s in sessions:
            if websocket and s.page is not None and not math.isnan(s.loaded_s):
                buttons[s.index] = s.page
            elif s.page is not None and not math.isnan(s.loaded_s):
                try:
                    buttons[s.index] = s.page.locator(TRAIN).first.element_handle(timeout=30_000)
                except Exception as e:  # noqa: BLE001
                    problems.append(f"session {s.index}: no Train button: {type(e).__name__}: {str(e)[:200]}")
        t_click0 = time.time()
        cpu0 = (cpu_seconds(srv.pid), cpu_seconds(comm="chrom"))
        for s in sessions:
            if s.index not in buttons:
                continue
            try:
                if websocket:
                    buttons[s.index].click("btn_train")
                else:
                    buttons[s.index].evaluate("b => b.click()")
                s.clicked = time.time()
            except Exception:  # noqa: BLE001  (the button was redrawn meanwhile: a real click then)
                try:
                    s.page.locator(TRAIN).first.click(timeout=30_000)
                    s.clicked = time.time()
                except Exception as e:  # noqa: BLE001
                    problems.append(f"session {s.index}: Train could not be clicked: {type(e).__name__}: "
                                    f"{str(e)[:200]}")
        print(f"Train pressed in {sum(not math.isnan(s.clicked) for s in sessions)} sessions "
              f"in {time.time() - t_click0:.1f} s", flush=True)

        pump = next(s.page for s in sessions if s.page is not None)
        last_rss = last_report = time.time()
        all_ended_at = math.nan
        while True:
            now = time.time()
            known = {r.path.name: r for r in watcher.snapshot()}
            if now - last_rss >= args.sample_every:
                rss.append((now, rss_mb(srv.pid)))
                last_rss = now
            mine = [r for r in known.values() if r.owner in by_sid]
            ended = [r for r in mine if not math.isnan(r.ended)]
            clicked = sum(not math.isnan(s.clicked) for s in sessions)
            if len(ended) >= clicked and math.isnan(all_ended_at):
                all_ended_at = now
            pages_done = all(not math.isnan(page_first(s.events, ("finished",) + BAD_STATES))
                             for s in sessions if not math.isnan(s.clicked))
            if not math.isnan(all_ended_at) and (pages_done or now - all_ended_at > args.grace):
                break
            if now - t_click0 > args.deadline:
                deadline_hit = True
                break
            if now - t_click0 > 60 and len(mine) == 0:
                problems.append("no run appeared within 60 s of pressing Train")
                break
            if now - last_report >= 15:
                states: dict[str, int] = {}
                for r in mine:
                    states[r.state or "?"] = states.get(r.state or "?", 0) + 1
                print(f"  t+{now - t_click0:5.0f} s: runs {dict(sorted(states.items()))}, server RSS "
                      f"{rss[-1][1]:.0f} MB", flush=True)
                last_report = now
            pump.wait_for_timeout(200)  # also delivers the pages' reports
        t_end = time.time()
        cpu = (cpu_seconds(srv.pid) - cpu0[0], cpu_seconds(comm="chrom") - cpu0[1])
        rss.append((t_end, rss_mb(srv.pid)))
    except Exception as e:  # noqa: BLE001
        print(f"benchmark could not run: {type(e).__name__}: {e}", file=sys.stderr)
        code = 2
        t_click0 = t_end = time.time()
        rss_loaded = math.nan
        cpu = (math.nan, math.nan)
    finally:
        try:
            if browser is not None:
                browser.close()
            if pw is not None:
                pw.stop()
            if ws_loop is not None:
                for s in sessions:
                    if s.page is not None:
                        s.page.close()
                ws_loop.stop()
        finally:
            watcher.stop()  # before the server: its shutdown marks unfinished runs "stopped"
            known = {r.path.name: r for r in watcher.snapshot()}
            stop_server(srv)
    if code == 2:
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        print("server log (tail):\n" + tail, file=sys.stderr)
        return 2

    # ------------------------------------------------------------------ results
    mine = {r.owner: r for r in known.values() if r.owner in by_sid}
    extra = [r for r in known.values() if r.owner not in by_sid]
    per_owner: dict[str, int] = {}
    for r in known.values():
        per_owner[r.owner or "?"] = per_owner.get(r.owner or "?", 0) + 1
    finished = sum(r.state == "finished" for r in mine.values())
    bad = [r for r in mine.values() if r.state in BAD_STATES]
    stopped = [r for r in bad if r.state == "stopped"]
    never = [s for s in sessions if not math.isnan(s.clicked) and s.sid not in mine]
    unstarted = [r for r in mine.values() if math.isnan(r.left_queue)]
    wrong_beta = [s for s in sessions if s.sid in mine and mine[s.sid].beta is not None
                  and abs(mine[s.sid].beta - s.beta) > 1e-9]
    waits, fins, stale, waited = [], [], [], 0
    for s in sessions:
        r = mine.get(s.sid)
        if r is None:
            continue
        showed_queue, left = page_leaves(s.events, "queued")
        if showed_queue or r.seen_queued:
            waited += 1
        if showed_queue:
            if math.isnan(left) or math.isnan(r.left_queue):
                stale.append(f"session {s.index}: the page still said it waits in the queue at the end "
                             f"(run {r.state or 'not started'})")
            else:
                waits.append((max(0.0, left - r.left_queue), s.index))
        end_shown = page_first(s.events, ("finished",) + BAD_STATES)
        if not math.isnan(r.ended):
            if math.isnan(end_shown):
                stale.append(f"session {s.index}: the page never showed that its run ended ({r.state})")
            else:
                fins.append((max(0.0, end_shown - r.ended), s.index))
    lat = [w for w, _ in waits]
    fin = [w for w, _ in fins]
    rss_vals = [v for _, v in rss if not math.isnan(v)]
    peak = max(rss_vals) if rss_vals else math.nan
    wall = t_end - t_click0
    loads = [s.loaded_s for s in sessions if not math.isnan(s.loaded_s)]
    vis = sorted({s.visibility for s in sessions if s.visibility})

    goals = {
        "every session's run finished": finished == n and not never and not deadline_hit,
        "no run stopped by another session": not stopped,
        "no run failed or interrupted": len(bad) == len(stopped),
        "each run has its session's β": not wrong_beta,
        f"waiting pages refresh within {args.goal_latency:g} s": (not stale and all(x <= args.goal_latency for x in lat)),
        f"server peak RSS <= {args.max_rss_mb:.0f} MB": peak <= args.max_rss_mb,
    }
    rows = [
        ("sessions" + (" (websocket clients: the server alone)" if websocket else " (browser contexts, one Chromium)"),
         f"{n}"),
        ("server slots (VAE_MAX_RUNS)", f"{args.max_runs or 'unset (default)'}"),
        ("page load, median / max", f"{fmt(statistics.median(loads) if loads else math.nan)} / "
                                    f"{fmt(max(loads) if loads else math.nan)}"),
        ("runs created / finished", f"{len(mine)} / {finished}"),
        ("runs stopped by another session", f"{len(stopped)}"),
        ("runs failed / interrupted", f"{len(bad) - len(stopped)}"),
        ("Train pressed but no run", f"{len(never)}"),
        ("runs that never left the queue", f"{len(unstarted)}"),
        ("runs with another β than their page's", f"{len(wrong_beta)}"),
        ("sessions that waited in the queue", f"{waited}"
         + (f" ({sum(r.imprecise for r in mine.values())} start times bounded, not read)"
            if any(r.imprecise for r in mine.values()) else "")),
        ("waiting pages: refresh latency max / median",
         f"{fmt(max(lat) if lat else math.nan, digits=2)} / {fmt(statistics.median(lat) if lat else math.nan, digits=2)}"
         f" (n={len(lat)}, goal <= {args.goal_latency:g} s)"),
        ("waiting pages that stayed stale", f"{len(stale)}"),
        ("'Finished' shown after the run ended, max / median",
         f"{fmt(max(fin) if fin else math.nan, digits=2)} / {fmt(statistics.median(fin) if fin else math.nan, digits=2)}"
         f" (n={len(fin)})"),
        ("server RSS idle / pages loaded / peak / end",
         f"{rss_idle:.0f} / {rss_loaded:.0f} / {peak:.0f} / {rss[-1][1]:.0f} MB ({len(rss)} samples)"),
        ("wall time: first Train to all ended and shown", fmt(wall)),
        ("CPU meanwhile: server (with its runs) / browser",
         f"{cpu[0]:.0f} s / {cpu[1]:.0f} s of {wall * (os.cpu_count() or 1):.0f} s"),
        ("wall time: total (server start to end)", fmt(t_end - t_start)),
    ]
    width = max(len(a) for a, _ in rows)
    print()
    print(f"A class on one server: {n} sessions ({'websocket clients' if websocket else 'Chromium pages'}), {platform.node()}, {os.cpu_count()} CPUs, "
          f"{dt.datetime.now().isoformat(timespec='minutes')}")
    print(f"load average (1 min) before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
          "(other work on the machine slows pages and runs alike)")
    print("-" * (width + 40))
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    print("-" * (width + 40))
    if waits:
        print("waiting pages, latency by session: " + ", ".join(f"#{i} {w:.2f} s" for w, i in sorted(waits, key=lambda x: x[1])))
    if vis and vis not in (["visible"], ["websocket"]):
        print(f"note: pages' document.visibilityState: {vis} (hidden pages may throttle timers)")
    for r in bad:
        problems.append(f"run {r.path.name} ended {r.state}: {r.message}")
    for s in never:
        problems.append(f"session {s.index}: Train pressed but no run of its own appeared")
    for s in wrong_beta:
        problems.append(f"session {s.index}: its run has β {mine[s.sid].beta} instead of {s.beta}")
    if extra:
        problems.append(f"{len(extra)} run(s) with no bench session as owner: {[r.path.name for r in extra][:5]}")
    if deadline_hit:
        problems.append(f"deadline of {args.deadline:g} s reached before every run ended")
    for p in problems + stale:
        print(f"problem: {p}")
    for goal, ok in goals.items():
        print(f"{'PASS' if ok else 'FAIL'}  {goal}")
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "t_click0": t_click0, "t_end": t_end, "rss_mb": rss,
            "cpu_s": {"server": cpu[0], "browser": cpu[1]},
            "sessions": [{"index": s.index, "sid": s.sid, "beta": s.beta, "loaded_s": s.loaded_s, "clicked": s.clicked,
                          "visibility": s.visibility, "events": s.events} for s in sessions],
            "runs": [{"name": r.path.name, "owner": r.owner, "beta": r.beta, "first_seen": r.first_seen,
                      "seen_queued": r.seen_queued, "imprecise": r.imprecise, "left_queue": r.left_queue, "ended": r.ended, "state": r.state,
                      "message": r.message} for r in known.values()],
        }, indent=1, default=str))
    if args.keep:
        print(f"kept {tmp} (runs/, server.log)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(goals.values()) and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
