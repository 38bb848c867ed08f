"""The admin port over a real loopback socket: endpoints, content types, readiness, escaping."""
from __future__ import annotations

import copy
import json
import re
import socket
from html.parser import HTMLParser

import aiohttp
import pytest

from gateway.admin import AdminServer, render_status_page
from gateway.admin.page import human_bytes, human_duration, short_digest
from gateway.observability.metrics import Metrics

DB_DIGEST = "sha256:8cf26c7b1f2e3d4c5b6a79880716253443526170f8e9d0c1b2a3948576a6b7c8"
JAVA_DIGEST = "sha256:0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
FAKE_PEM = (b"-----BEGIN CERTIFICATE-----\nMIIBfakefakefakefake\n-----END CERTIFICATE-----\n")


def sample_status() -> dict:
    """A status dict of the shape the application produces (see gateway.admin docs)."""
    return {
        "version": "0.1.0",
        "uptime_seconds": 3725.4,
        "ready": True,
        "draining": False,
        "hit_ratio": 0.9333,
        "cache_results": {"hit": 14, "miss": 1, "stale": 2, "coalesced": 3, "negative": 0,
                          "revalidated": 1},
        "bytes_served": {"cache": 5 * 1024**3, "upstream": 113_246_208},
        "artifacts": [
            {"artifact": "vulnerability_db", "reference": "mirror.gcr.io/aquasec/trivy-db:2",
             "digest": DB_DIGEST, "size": 113_246_208, "fetched_at": 1_700_000_000.0,
             "age_seconds": 7320.0, "stale": False},
            {"artifact": "java_db", "reference": "ghcr.io/aquasecurity/trivy-java-db:1",
             "digest": JAVA_DIGEST, "size": 681_574_400, "fetched_at": 1_699_900_000.0,
             "age_seconds": 2 * 86400 + 3 * 3600, "stale": True},
            {"artifact": "checks_bundle", "reference": "mirror.gcr.io/aquasec/trivy-checks:2",
             "digest": "sha256:" + "c" * 64, "size": 812_000, "fetched_at": 1_700_000_100.0,
             "age_seconds": 45.0, "stale": False},
        ],
        "upstreams": {
            "mirror.gcr.io": {"circuit": "closed", "open_remaining": 0.0, "rate": 20.0,
                              "queue_depth": 0, "in_flight": 1, "last_status": 200,
                              "last_error": None, "requests": 42},
            "ghcr.io": {"circuit": "open", "open_remaining": 27.6, "rate": 2.5,
                        "queue_depth": 4, "in_flight": 0, "last_status": 429,
                        "last_error": "429 TOOMANYREQUESTS", "requests": 9},
            "repo.maven.apache.org": {"circuit": "half_open", "open_remaining": 0.0, "rate": 5.0,
                                      "queue_depth": 0, "in_flight": 0, "last_status": 503,
                                      "last_error": None, "requests": 3},
        },
        "cache": {"size_bytes": 800 * 1024**2, "max_size_bytes": 20 * 1024**3, "blobs": 3,
                  "entries": 17, "disk_free_bytes": 200 * 1024**3},
        "ca": {"subject": "CN=trivy-gateway CA",
               "fingerprint_sha256": "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:"
                                     "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89",
               "not_after": "2036-11-20T13:21:04Z"},
    }


HOSTILE = {
    "host": "<script>alert('host')</script>.example",
    "reference": '"><img src=x onerror=alert(1)>',
    "error": "</td></tr></table><h1 id=pwned>pwned</h1>",
    "version": "0.1.0 & <b>bold</b>",
    "subject": "CN=<iframe src=//evil>",
}


def hostile_status() -> dict:
    status = sample_status()
    status["version"] = HOSTILE["version"]
    status["artifacts"][0]["reference"] = HOSTILE["reference"]
    status["artifacts"][1]["artifact"] = "<svg onload=alert(2)>"
    status["artifacts"][1]["digest"] = 'sha256:"onmouseover="alert(3)' + "a" * 40
    status["upstreams"][HOSTILE["host"]] = {"circuit": "<b>open</b>", "last_error": HOSTILE["error"],
                                            "last_status": "<i>", "requests": "<u>"}
    status["cache_results"]["<em>x</em>"] = 1
    status["ca"]["subject"] = HOSTILE["subject"]
    return status


class _Elements(HTMLParser):
    """Collects start tags and attributes the way a browser's tokenizer would see them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Elements:
    p = _Elements()
    p.feed(page)
    p.close()
    return p


class State:
    def __init__(self) -> None:
        self.status = sample_status()
        self.ready = True
        self.ca = FAKE_PEM
        self.fail_status = False

    def status_fn(self) -> dict:
        if self.fail_status:
            raise RuntimeError("cache index <locked>")
        return self.status

    def ready_fn(self) -> bool:
        if self.ready is None:
            raise OSError("probe broke")
        return self.ready

    def ca_fn(self) -> bytes:
        if self.ca is None:
            raise FileNotFoundError("ca.pem")
        return self.ca


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
async def admin(state):
    metrics = Metrics(known_hosts=["ghcr.io", "mirror.gcr.io"])
    server = AdminServer(metrics, state.status_fn, state.ready_fn, state.ca_fn, "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def client():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def get(client, admin, path, **kw):
    async with client.get(f"http://127.0.0.1:{admin.port}{path}", **kw) as resp:
        return resp.status, resp.headers, await resp.read()


# -- lifecycle ------------------------------------------------------------------------------

async def test_port_zero_binds_a_real_port_and_close_releases_it(state):
    server = AdminServer(Metrics(), state.status_fn, state.ready_fn, state.ca_fn, "127.0.0.1", 0)
    assert server.port == 0
    await server.start()
    port = server.port
    assert port > 0
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    await server.close()
    await server.close()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_async_context_manager_and_async_callables():
    async def status():
        return {"version": "9.9.9"}

    async def ready():
        return False

    async def ca():
        return FAKE_PEM

    async with AdminServer(Metrics(), status, ready, ca, "127.0.0.1", 0) as server:
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/api/status") as resp:
                assert (await resp.json()) == {"version": "9.9.9"}
            async with session.get(server.url + "/readyz") as resp:
                assert resp.status == 503


# -- probes ---------------------------------------------------------------------------------

async def test_healthz(admin, client):
    status, headers, body = await get(client, admin, "/healthz")
    assert status == 200
    assert body.strip() == b"ok"
    assert headers["Content-Type"].startswith("text/plain")


async def test_healthz_stays_up_while_not_ready(admin, client, state):
    state.ready = False
    assert (await get(client, admin, "/healthz"))[0] == 200


async def test_readyz_follows_ready(admin, client, state):
    status, _, body = await get(client, admin, "/readyz")
    assert status == 200 and body.strip() == b"ready"
    state.ready = False  # draining
    status, _, body = await get(client, admin, "/readyz")
    assert status == 503
    assert b"not ready" in body
    state.ready = True
    assert (await get(client, admin, "/readyz"))[0] == 200


async def test_readyz_503_when_ready_raises(admin, client, state):
    state.ready = None
    status, _, body = await get(client, admin, "/readyz")
    assert status == 503
    assert b"OSError" in body


async def test_head_requests(admin, client):
    async with client.head(f"http://127.0.0.1:{admin.port}/healthz") as resp:
        assert resp.status == 200
    async with client.head(f"http://127.0.0.1:{admin.port}/") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")


async def test_unknown_path_404_and_post_405(admin, client):
    status, headers, _ = await get(client, admin, "/admin/../etc/passwd")
    assert status == 404
    assert headers["X-Content-Type-Options"] == "nosniff"
    async with client.post(f"http://127.0.0.1:{admin.port}/readyz") as resp:
        assert resp.status == 405


# -- metrics --------------------------------------------------------------------------------

async def test_metrics_prometheus_text(admin, client):
    admin.metrics.cache_requests.labels("ghcr.io", "oci_blob", "hit").inc(3)
    admin.metrics.served_bytes.labels("cache").inc(1234)
    admin.metrics.artifact_age.labels("vulnerability_db").set(60)
    status, headers, body = await get(client, admin, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert 'trivy_gateway_cache_requests_total{host="ghcr.io",kind="oci_blob",result="hit"} 3.0' in text
    assert 'trivy_gateway_served_bytes_total{source="cache"} 1234.0' in text
    assert 'trivy_gateway_artifact_age_seconds{artifact="vulnerability_db"} 60.0' in text
    assert "# TYPE trivy_gateway_upstream_request_duration_seconds histogram" in text
    # nothing from the process-global default registry leaks in
    assert "python_gc_objects_collected_total" not in text


async def test_metrics_openmetrics_when_asked(admin, client):
    status, headers, body = await get(
        client, admin, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


# -- CA -------------------------------------------------------------------------------------

async def test_ca_pem_is_a_download(admin, client):
    status, headers, body = await get(client, admin, "/ca.pem")
    assert status == 200
    assert headers["Content-Type"] == "application/x-pem-file"
    assert headers["Content-Disposition"].startswith("attachment")
    assert "filename=" in headers["Content-Disposition"]
    assert body == FAKE_PEM


async def test_ca_pem_503_when_missing(admin, client, state):
    state.ca = None
    status, _, body = await get(client, admin, "/ca.pem")
    assert status == 503
    assert b"not available" in body


# -- JSON status ----------------------------------------------------------------------------

async def test_api_status_is_the_status_dict(admin, client, state):
    status, headers, body = await get(client, admin, "/api/status")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == state.status


async def test_api_status_non_finite_numbers_become_null(admin, client, state):
    state.status = {"hit_ratio": float("nan"), "uptime_seconds": float("inf"), "x": (1, 2)}
    status, _, body = await get(client, admin, "/api/status")
    assert status == 200
    assert json.loads(body) == {"hit_ratio": None, "uptime_seconds": None, "x": [1, 2]}


async def test_api_status_500_when_status_raises(admin, client, state):
    state.fail_status = True
    status, _, body = await get(client, admin, "/api/status")
    assert status == 500
    assert "RuntimeError" in json.loads(body)["error"]


# -- the HTML page --------------------------------------------------------------------------

async def test_page_headers(admin, client):
    status, headers, body = await get(client, admin, "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert headers["Cache-Control"] == "no-store"
    assert body.startswith(b"<!DOCTYPE html>")


async def test_page_shows_the_essentials(admin, client):
    _, _, body = await get(client, admin, "/")
    page = body.decode()
    doc = parse(page)
    text = re.sub(r"\s+", " ", " ".join(doc.text))
    # no scripts at all, auto-refresh by meta tag
    assert not [t for t, _ in doc.tags if t == "script"]
    assert ("meta", {"http-equiv": "refresh", "content": "10"}) in doc.tags
    # version, uptime, ready
    assert "0.1.0" in text and "1h 2m" in text and "ready" in text
    # artifacts: one row each, reference, short digest with the full one in the title
    rows = [a for t, a in doc.tags if t == "tr" and a.get("class") == "artifact"]
    assert [r["data-artifact"] for r in rows] == ["vulnerability_db", "java_db", "checks_bundle"]
    assert "Vulnerability DB" in text and "Java DB" in text and "Checks bundle" in text
    assert "mirror.gcr.io/aquasec/trivy-db:2" in text
    assert "sha256:8cf26c7b1f2e\u2026" in text and DB_DIGEST not in text
    assert ("td", {"class": "digest", "title": DB_DIGEST}) in doc.tags
    assert "108.0 MiB" in text and "650.0 MiB" in text
    assert "2h 2m" in text and "2d 3h" in text and "45s" in text
    assert text.count("stale") >= 1
    # cache effectiveness
    assert "93.3%" in text
    assert "5.0 GiB" in text and "108.0 MiB" in text
    # upstreams: every circuit state has its class; the open one shows its remaining time
    circuits = {a["class"] for t, a in doc.tags if t == "span" and "circuit" in a.get("class", "")}
    assert circuits == {"badge circuit circuit-closed", "badge circuit circuit-open",
                        "badge circuit circuit-half_open"}
    assert "half-open" in text and "28s" in text and "2.5/s" in text
    assert "429 TOOMANYREQUESTS" in text
    # disk usage vs budget
    assert "800.0 MiB of 20.0 GiB (3.9%)" in text
    # CA
    assert ("a", {"class": "download", "id": "ca-link", "href": "/ca.pem",
                  "download": "trivy-gateway-ca.pem"}) in doc.tags
    assert sample_status()["ca"]["fingerprint_sha256"] in text


async def test_page_escapes_hostile_strings(admin, client, state):
    state.status = hostile_status()
    _, _, body = await get(client, admin, "/")
    page = body.decode()
    for raw in list(HOSTILE.values()) + ["<svg onload=alert(2)>", "<b>open</b>", "<em>x</em>"]:
        assert raw not in page, raw
    doc = parse(page)
    tags = {t for t, _ in doc.tags}
    assert not tags & {"script", "img", "iframe", "svg", "b", "em", "i", "u"}
    assert [t for t, _ in doc.tags if t == "h1"] == ["h1"]  # only the page's own heading
    assert not [a for _, a in doc.tags if a.get("id") == "pwned"]
    for tag, attrs in doc.tags:
        assert not [k for k in attrs if k.startswith("on")], (tag, attrs)
    # the text a person reads is the original string, shown literally
    text = "".join(doc.text)
    assert HOSTILE["host"] in text
    assert HOSTILE["error"] in text
    assert HOSTILE["reference"] in text
    assert HOSTILE["subject"] in text
    # an unknown circuit state is not given a trusted colour class
    assert any(t == "span" and a.get("class") == "badge circuit circuit-unknown"
               for t, a in doc.tags)


async def test_page_renders_when_status_raises(admin, client, state):
    state.fail_status = True
    status, _, body = await get(client, admin, "/")
    assert status == 200
    page = body.decode()
    assert "Status unavailable" in page
    assert "cache index &lt;locked&gt;" in page
    assert "/ca.pem" in page  # the CA link is still there


@pytest.mark.parametrize("status", [
    {},
    {"artifacts": None, "upstreams": None, "cache": None, "ca": None, "cache_results": None},
    {"artifacts": [{}], "upstreams": {"h": {}}, "cache": {"size_bytes": "x", "max_size_bytes": 0},
     "hit_ratio": "nope", "uptime_seconds": None, "bytes_served": {"cache": None}},
    {"artifacts": ["not a dict", 3], "upstreams": {"h": None}, "ready": "yes"},
])
def test_page_renders_missing_or_malformed_keys(status):
    page = render_status_page(status)
    assert page.startswith("<!DOCTYPE html>")
    assert "/ca.pem" in page
    parse(page)


def test_page_without_data_says_so():
    page = render_status_page({}, refresh_seconds=0)
    assert "No Trivy artifact has been cached yet" in page
    assert "No upstream has been contacted yet" in page
    assert 'http-equiv="refresh"' not in page
    assert "readiness unknown" in page


def test_draining_is_shown():
    page = render_status_page({"ready": False, "draining": True})
    assert ">draining<" in page


def test_status_is_not_mutated():
    status = sample_status()
    before = copy.deepcopy(status)
    render_status_page(status)
    assert status == before


@pytest.mark.parametrize("value,expected", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (113_246_208, "108.0 MiB"),
    (5 * 1024**3, "5.0 GiB"), (None, "\u2014"), ("12", "\u2014"), (float("nan"), "\u2014"),
    (True, "\u2014"),
])
def test_human_bytes(value, expected):
    assert human_bytes(value) == expected


@pytest.mark.parametrize("value,expected", [
    (0, "0s"), (59.9, "59s"), (60, "1m 0s"), (3725, "1h 2m"), (2 * 86400 + 3 * 3600, "2d 3h"),
    (-5, "0s"), (None, "\u2014"),
])
def test_human_duration(value, expected):
    assert human_duration(value) == expected


def test_short_digest():
    assert short_digest(DB_DIGEST) == "sha256:8cf26c7b1f2e\u2026"
    assert short_digest("sha256:abc") == "sha256:abc"
    assert short_digest("x" * 40) == "x" * 23 + "\u2026"
