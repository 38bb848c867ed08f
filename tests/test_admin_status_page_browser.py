"""The status page in a real headless browser (Debian's ``chromium``): what a person sees.

Three looks at the same page served by a real :class:`AdminServer` on 127.0.0.1:

* ``--dump-dom``: the DOM after parsing (artifact rows, the open circuit, the CA link);
* ``--screenshot``: a PNG of the rendered page (kept when TRIVY_GATEWAY_SCREENSHOT_DIR is set);
* the DevTools protocol: ``innerText`` (the text actually rendered, hidden elements excluded),
  computed colours of the circuit badges, and a click on the CA link that downloads the PEM.

Chromium missing is a failure, not a skip, unless TRIVY_GATEWAY_SKIP_BROWSER=1.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import struct
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.admin import AdminServer
from gateway.observability.metrics import Metrics

try:  # tests/ is on sys.path (rootdir-relative import mode) or a package
    from test_admin_server import FAKE_PEM, HOSTILE, parse, sample_status
except ImportError:  # pragma: no cover
    from tests.test_admin_server import FAKE_PEM, HOSTILE, parse, sample_status

WINDOW = (1280, 1400)
BROWSER_TIMEOUT = 60.0


def chromium_path() -> str:
    if os.environ.get("TRIVY_GATEWAY_SKIP_BROWSER") == "1":
        pytest.skip("TRIVY_GATEWAY_SKIP_BROWSER=1")
    for candidate in (os.environ.get("TRIVY_GATEWAY_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("Debian's chromium is required for this test: apt-get install -y chromium "
                "(or set TRIVY_GATEWAY_SKIP_BROWSER=1 to skip it knowingly)")


def base_args(binary: str, profile: Path) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", "--no-proxy-server",
            "--disable-default-apps", "--disable-extensions", "--hide-scrollbars",
            "--mute-audio", f"--window-size={WINDOW[0]},{WINDOW[1]}",
            f"--user-data-dir={profile}"]


def browser_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_CACHE_HOME=str(home / ".cache"))
    return env


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Stop the browser we started and every helper process it forked (its own session)."""
    def signal_group(sig: int) -> bool:
        try:
            os.killpg(proc.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    if proc.returncode is None:
        signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            signal_group(signal.SIGKILL)
            await proc.wait()
    for _ in range(50):  # helpers (zygote, renderer) follow within a moment; ≤ 5 s
        if not signal_group(0):
            return
        await asyncio.sleep(0.1)
    signal_group(signal.SIGKILL)


async def run_chromium(args: list[str], env: dict) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BROWSER_TIMEOUT)
    finally:
        await _stop(proc)
    return proc.returncode, out, err


def page_status() -> dict:
    status = sample_status()
    # one hostile string, to see that the browser shows it as text and runs nothing
    status["upstreams"]["ghcr.io"]["last_error"] = HOSTILE["error"]
    return status


@pytest.fixture
async def admin():
    server = AdminServer(Metrics(), page_status, lambda: True, lambda: FAKE_PEM, "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
def browser(tmp_path):
    binary = chromium_path()
    home = tmp_path / "home"
    home.mkdir()
    return binary, tmp_path, browser_env(home)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


async def test_dump_dom_shows_artifacts_circuits_and_ca_link(admin, browser):
    binary, tmp, env = browser
    args = base_args(binary, tmp / "profile-dom") + [
        "--virtual-time-budget=3000", "--dump-dom", f"http://127.0.0.1:{admin.port}/"]
    rc, out, err = await run_chromium(args, env)
    assert rc == 0, err.decode(errors="replace")[-2000:]
    dom = out.decode()
    doc = parse(dom)
    text = re.sub(r"\s+", " ", " ".join(doc.text))
    assert "Cached Trivy artifacts" in text
    rows = [a.get("data-artifact") for t, a in doc.tags if t == "tr" and a.get("class") == "artifact"]
    assert rows == ["vulnerability_db", "java_db", "checks_bundle"]
    for ref in ("mirror.gcr.io/aquasec/trivy-db:2", "ghcr.io/aquasecurity/trivy-java-db:1"):
        assert ref in text
    # the ghcr.io row carries the open circuit badge, and it says "open"
    ghcr = re.search(r'<tr class="upstream" data-host="ghcr\.io">(.*?)</tr>', dom, re.S)
    assert ghcr, "no ghcr.io row"
    assert re.search(r'<span class="badge circuit circuit-open">open</span>', ghcr.group(1))
    assert ("a", {"class": "download", "id": "ca-link", "href": "/ca.pem",
                  "download": "trivy-gateway-ca.pem"}) in doc.tags
    # the hostile error string became text, not markup
    assert not [a for _, a in doc.tags if a.get("id") == "pwned"]
    assert not [t for t, _ in doc.tags if t == "script"]


async def test_screenshot(admin, browser):
    binary, tmp, env = browser
    shot = tmp / "status-page.png"
    args = base_args(binary, tmp / "profile-shot") + [
        "--virtual-time-budget=3000", f"--screenshot={shot}", f"http://127.0.0.1:{admin.port}/"]
    rc, _, err = await run_chromium(args, env)
    assert rc == 0, err.decode(errors="replace")[-2000:]
    data = shot.read_bytes()
    width, height = png_size(data)
    assert (width, height) == WINDOW
    assert len(data) > 20_000, "suspiciously small screenshot (blank page?)"
    keep = os.environ.get("TRIVY_GATEWAY_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "status-page.png")


# -- DevTools protocol: rendered text, colours, clicking the CA link ---------------------------

class CDP:
    """Minimal Chrome DevTools Protocol client over one websocket (aiohttp)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self._id = 0

    async def call(self, method: str, params: dict | None = None, session: str | None = None):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        for _ in range(10_000):  # bounded: events may arrive before our answer
            reply = await asyncio.wait_for(self.ws.receive_json(), 20)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise AssertionError(f"no answer to {method}")

    async def evaluate(self, session: str, expression: str):
        result = await self.call("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True}, session)
        if "exceptionDetails" in result:
            raise AssertionError(result["exceptionDetails"])
        return result["result"].get("value")


async def _devtools_port(profile: Path, proc: asyncio.subprocess.Process) -> int:
    marker = profile / "DevToolsActivePort"
    for _ in range(300):  # up to 30 s
        if marker.exists():
            first = marker.read_text().splitlines()[:1]
            if first and first[0].isdigit():
                return int(first[0])
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.1)
    raise AssertionError("chromium did not open its DevTools port")


SEE = r"""
new Promise(resolve => {
  const done = () => {
    const style = sel => { const el = document.querySelector(sel);
      if (!el) return null;
      const cs = getComputedStyle(el), r = el.getBoundingClientRect();
      return {text: el.innerText, bg: cs.backgroundColor, color: cs.color,
              visible: r.width > 0 && r.height > 0 && cs.visibility !== 'hidden'}; };
    resolve({
      text: document.body.innerText,
      title: document.title,
      open: style('tr[data-host="ghcr.io"] .circuit'),
      closed: style('tr[data-host="mirror.gcr.io"] .circuit'),
      half: style('tr[data-host="repo.maven.apache.org"] .circuit'),
      stale: style('tr[data-artifact="java_db"] td.stale .badge'),
      link: style('#ca-link'),
      digestTitle: document.querySelector('tr[data-artifact="vulnerability_db"] td.digest').title,
      scripts: document.scripts.length,
    });
  };
  if (document.readyState === 'complete') done(); else addEventListener('load', done);
})
"""


def _rgb(css: str) -> tuple[int, int, int]:
    m = re.match(r"rgba?\((\d+), (\d+), (\d+)", css)
    assert m, css
    return tuple(int(x) for x in m.groups())


async def test_person_sees_status_and_downloads_ca(admin, browser):
    binary, tmp, env = browser
    profile = tmp / "profile-cdp"
    downloads = tmp / "downloads"
    downloads.mkdir()
    args = base_args(binary, profile) + ["--remote-debugging-port=0",
                                         "--remote-debugging-address=127.0.0.1", "about:blank"]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env,
        start_new_session=True)
    try:
        port = await _devtools_port(profile, proc)
        timeout = aiohttp.ClientTimeout(total=BROWSER_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(f"http://127.0.0.1:{port}/json/version") as resp:
                ws_url = (await resp.json())["webSocketDebuggerUrl"]
            assert ws_url.startswith("ws://127.0.0.1:")
            async with http.ws_connect(ws_url, max_msg_size=64 * 1024 * 1024) as ws:
                cdp = CDP(ws)
                await cdp.call("Browser.setDownloadBehavior", {
                    "behavior": "allow", "downloadPath": str(downloads)})
                target = (await cdp.call("Target.createTarget", {"url": "about:blank"}))["targetId"]
                session = (await cdp.call("Target.attachToTarget", {
                    "targetId": target, "flatten": True}))["sessionId"]
                await cdp.call("Page.enable", {}, session)
                await cdp.call("Page.navigate", {"url": f"http://127.0.0.1:{admin.port}/"}, session)
                seen = None
                for _ in range(100):  # until the navigation has committed (≤ 10 s)
                    href = await cdp.evaluate(session, "location.href")
                    if href.startswith("http://127.0.0.1") and await cdp.evaluate(
                            session, "document.readyState") == "complete":
                        seen = await cdp.evaluate(session, SEE)
                        break
                    await asyncio.sleep(0.1)
                assert seen, "the status page never finished loading"

                text = seen["text"]
                assert seen["title"] == "trivy-gateway status"
                assert seen["scripts"] == 0
                for expected in ("Cached Trivy artifacts", "Vulnerability DB", "Java DB",
                                 "Checks bundle", "mirror.gcr.io/aquasec/trivy-db:2",
                                 "108.0 MiB", "650.0 MiB", "2d 3h", "93.3%", "5.0 GiB",
                                 "Upstream health", "ghcr.io", "28s",
                                 "800.0 MiB of 20.0 GiB (3.9%)",
                                 "Download CA certificate (ca.pem)", "AB:CD:EF:01"):
                    assert expected in text, expected
                # the hostile error is shown to the person literally
                assert HOSTILE["error"] in text
                assert seen["digestTitle"].startswith("sha256:8cf26c7b1f2e") and \
                    len(seen["digestTitle"]) == 71

                # circuit badges: visible, labelled, coloured (open red, closed green, half amber)
                assert seen["open"]["visible"] and seen["open"]["text"].strip() == "open"
                assert seen["closed"]["text"].strip() == "closed"
                assert seen["half"]["text"].strip() == "half-open"
                r, g, b = _rgb(seen["open"]["bg"])
                assert r > 150 and g < 80 and b < 80, seen["open"]
                r, g, b = _rgb(seen["closed"]["bg"])
                assert g > r and g > b, seen["closed"]
                r, g, b = _rgb(seen["half"]["bg"])
                assert r > 150 and g > 120 and b < 100, seen["half"]
                assert seen["stale"]["visible"] and seen["stale"]["text"].strip() == "stale"

                # the CA link is visible and clicking it downloads the certificate
                assert seen["link"]["visible"]
                await cdp.evaluate(session, "document.getElementById('ca-link').click()")
                target_file = downloads / "trivy-gateway-ca.pem"
                for _ in range(100):  # ≤ 10 s
                    if target_file.exists() and target_file.read_bytes() == FAKE_PEM:
                        break
                    await asyncio.sleep(0.1)
                assert target_file.exists(), sorted(p.name for p in downloads.iterdir())
                assert target_file.read_bytes() == FAKE_PEM
                await cdp.call("Target.closeTarget", {"targetId": target})
    finally:
        await _stop(proc)


def test_missing_chromium_fails_rather_than_skips(monkeypatch):
    """The guard itself: no browser and no opt-out is a failure."""
    monkeypatch.delenv("TRIVY_GATEWAY_SKIP_BROWSER", raising=False)
    monkeypatch.setenv("TRIVY_GATEWAY_CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setattr(os, "access", lambda *_: False)
    monkeypatch.setattr(shutil, "which", lambda *_: None)
    with pytest.raises(pytest.fail.Exception):
        chromium_path()
    monkeypatch.setenv("TRIVY_GATEWAY_SKIP_BROWSER", "1")
    with pytest.raises(pytest.skip.Exception):
        chromium_path()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
