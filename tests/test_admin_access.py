"""Admin port access: optional bearer token for /metrics, /api/status and the page; probes and
/ca.pem stay open; warnings at start when the proxy/admin ports are exposed without auth."""
from __future__ import annotations

import base64
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from gateway.admin import AdminServer
from gateway.observability.metrics import Metrics
from tests.gateway_harness import free_port

TOKEN = "s3cret-token"
PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _get(url: str, auth: str = "") -> int:
    req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_gateway_admin_token_from_file_protects_traffic_views(tmp_path, make_gateway):
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    gw = make_gateway(extra={"server": {"admin_token_file": str(token_file)}})
    for path in ("/metrics", "/api/status", "/"):
        assert _get(gw.admin_url + path) == 401
        assert _get(gw.admin_url + path, "Bearer wrong") == 401
        assert _get(gw.admin_url + path, f"Bearer {TOKEN}") == 200
    for path in ("/healthz", "/readyz", "/ca.pem"):
        assert _get(gw.admin_url + path) == 200
    assert TOKEN not in gw.log_tail(200)


async def test_browser_may_send_the_token_as_basic_password():
    server = AdminServer(Metrics(), dict, lambda: True, lambda: PEM, "127.0.0.1", 0, token=TOKEN)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/") as r:
                assert r.status == 401 and "Basic" in r.headers["WWW-Authenticate"]
            good = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
            async with session.get(server.url + "/", headers={"Authorization": f"Basic {good}"}) as r:
                assert r.status == 200
            async with session.get(server.url + "/metrics",
                                   headers={"Authorization": "Basic !!notbase64"}) as r:
                assert r.status == 401
    finally:
        await server.close()


def _events_after_start(gw) -> dict:
    """Log events up to gateway_started (lines reach the file up to ~20 ms late: bounded wait)."""
    deadline = time.monotonic() + 10
    while True:
        events = {e.get("event"): e for e in gw.log_events()}
        if "gateway_started" in events or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


@pytest.mark.parametrize("listen, warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_start_warns_when_proxy_and_admin_are_exposed_without_auth(make_gateway, listen, warned):
    gw = make_gateway(extra={"server": {"listen": f"{listen}:{free_port()}",
                                        "admin_listen": f"{listen}:{free_port()}"}})
    events = _events_after_start(gw)
    assert ("proxy_without_auth" in events) is warned
    assert ("admin_without_token" in events) is warned
    if warned:
        assert events["proxy_without_auth"]["level"] == "warning"
    # the admin server logs through structlog like the rest of the gateway
    assert events["admin_listening"]["token_required"] is False


def test_start_warns_when_env_overrides_the_config_file(make_gateway, monkeypatch, tmp_path):
    other = tmp_path / "env-data"
    monkeypatch.setenv("TRIVY_GATEWAY_DATA_DIR", str(other))
    gw = make_gateway()
    events = _events_after_start(gw)
    assert str(gw.data_dir) in events["config_overridden_by_env"]["detail"]
    assert (other / "ca" / "ca.pem").is_file()
