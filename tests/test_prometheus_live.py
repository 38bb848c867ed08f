"""A real Prometheus scrapes a real gateway; every Grafana panel expression returns data.

One gateway subprocess (``make_gateway``) in front of the emulated world; Debian's ``prometheus``
scrapes its admin ``/metrics`` every second with deploy/prometheus/prometheus.yml (target and
intervals changed, the alert rules loaded). Real traffic flows through the proxy in two phases
with a scrape between them, like a gateway that has been serving for a while: first misses and hits
of every Trivy artifact and a 429 with Retry-After; then the same again plus one of each rare event
(a corrupted blob, a cut blob resumed with Range, a 404 answered by the failover partner, a 429 on
a blob, evictions, a disk that fails mid-fill, a denied host, a blind tunnel, a 407, a malformed
request, a failed TLS handshake). Prefetch watches the VEX Hub archive every second meanwhile
(the lifecycle panels), and a check after the traffic is awaited. Then each expression of
deploy/grafana/dashboards/trivy-gateway.json is sent to Prometheus's ``/api/v1/query`` with the
dashboard variables filled in as Grafana would (and each time-series panel also to
``/api/v1/query_range`` with Grafana's $__rate_interval for 1 s scrapes). Each must return data,
and every panel except those of instantaneous state (MAY_BE_ZERO) must show a value above 0: the
traffic that flowed.
The alert rules must evaluate without error, and the one corrupted blob must fire
TrivyGatewayDigestMismatches.

A panel that stays empty or flat here names a metric the code does not emit usably under real
traffic: fix the metric or the panel, not this test. (Found that way: labelled counters of rare
events appeared already at 1, so increase() never saw the first event; gateway/observability/
metrics.py now exports them at 0 from the start.)
"""
from __future__ import annotations

import asyncio
import json
import math
import shutil
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway.observability.metrics import ARTIFACTS
from tests.emulated.world import CODELOAD, GHCR, MAVEN, MIRROR, REPOSITORIES
from tests.gateway_harness import REPO, free_port

try:  # tests/ is on sys.path (rootdir-relative import mode) or a package
    from test_deploy_artifacts import ALERTS, dashboard
except ImportError:  # pragma: no cover
    from tests.test_deploy_artifacts import ALERTS, dashboard

pytestmark = pytest.mark.slow

USER, PASSWORD = "scanner", "prom-live-secret"
MANIFEST_ACCEPT = ("application/vnd.oci.image.manifest.v1+json,"
                   "application/vnd.docker.distribution.manifest.v2+json")
SCRAPE_INTERVAL = 1.0
#: a fill stored as one file larger than this fails like a full disk (RLIMIT_FSIZE)
FSIZE_LIMIT = 2 * 1024 * 1024
DENIED_HOST = "not-allowed.example.test"
PROXY_AUTH = aiohttp.encode_basic_auth(USER, PASSWORD)
#: panels of instantaneous state, idle once the traffic is over: they may read 0 (or NaN for a
#: quantile of a host without traffic); every other panel must show the traffic that flowed
MAY_BE_ZERO = {"Open circuits [A]", "Fills in flight [A]", "Circuit state per host [A]",
               "Rate limiter [A]", "Rate limiter [B]", "Client connections [A]",
               "Cached objects and fills in flight [B]",
               # failed checks in a row and "upstream is ahead": 0 while prefetch is healthy
               "Prefetch checks and upstream ahead [B]", "Prefetch checks and upstream ahead [C]",
               # fleet-only series: exported at 0 by every gateway, above 0 only with
               # cache.shared (tests/test_scale_out.py checks them on real replicas)
               "Fills by source (fleet) [A]", "Shared store and fleet circuits [A]",
               "Shared store and fleet circuits [B]"}
#: the artifact prefetched here: the only one whose blobs no traffic phase needs as misses (the
#: DB blobs meet one-shot faults, the checks layer a corruption, the Java DB layer the 307 to the
#: CDN); its checks go to github.com and codeload.github.com, where no fault is ever set
PREFETCHED = "vex_hub"


# ---------------------------------------------------------------------------------------------
# a real Prometheus
# ---------------------------------------------------------------------------------------------
class Prometheus:
    """``prometheus`` scraping one gateway with the Compose deployment's configuration."""

    def __init__(self, workdir: Path, admin_addr: str) -> None:
        self.workdir = workdir
        self.admin_addr = admin_addr
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = workdir / "prometheus.log"

    def config(self) -> dict:
        cfg = yaml.safe_load((ALERTS.parent / "prometheus.yml").read_text("utf-8"))
        cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = \
            f"{SCRAPE_INTERVAL:g}s"
        cfg["rule_files"] = [str(ALERTS)]
        for job in cfg["scrape_configs"]:
            target = self.admin_addr if job["job_name"] == "trivy-gateway" else f"127.0.0.1:{self.port}"
            for static in job["static_configs"]:
                static["targets"] = [target]
        return cfg

    def start(self, timeout: float = 30.0) -> "Prometheus":
        binary = shutil.which("prometheus")
        if not binary:
            pytest.fail("prometheus not on PATH: install Debian's 'prometheus' package (.ci/run does)")
        for _ in range(3):  # another process may take the free port first
            self.port = free_port()
            cfg_path = self.workdir / "prometheus.yml"
            cfg_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [binary, f"--config.file={cfg_path}",
                     f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{self.port}"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    time.sleep(0.1)
            self.stop()
            if "address already in use" not in self.log_tail():
                break
        raise RuntimeError(f"prometheus did not become ready:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "<no log>"

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=f"{step:g}")
        assert data["resultType"] == "matrix", data
        return data["result"]

    def wait_for(self, what: str, check, timeout: float = 60.0):
        """Poll ``check()`` (bounded) until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.2)


@pytest.fixture
def prometheus(tmp_path):
    started: list[Prometheus] = []

    def factory(admin_addr: str) -> Prometheus:
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        started.append(Prometheus(workdir, admin_addr))
        return started[-1].start()

    yield factory
    for p in started:
        p.stop()
        print(f"--- prometheus log tail ---\n{p.log_tail()}")


# ---------------------------------------------------------------------------------------------
# the dashboard's expressions, as Grafana sends them
# ---------------------------------------------------------------------------------------------
def panel_exprs() -> list[tuple[str, str, bool]]:
    """(panel title [refId], expression, instant?) for every query of every panel."""
    out = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((f"{panel['title']} [{target.get('refId', '?')}]", target["expr"],
                                bool(target.get("instant"))))

    walk(dashboard()["panels"])
    return out


def instance_values(prom: Prometheus) -> list[str]:
    """The ``instance`` variable: ``label_values(<metric>, instance)`` through the label API."""
    var = next(v for v in dashboard()["templating"]["list"] if v["name"] == "instance")
    query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    metric, label = (s.strip() for s in query.removeprefix("label_values(").rstrip(")").split(","))
    return prom.api(f"label/{label}/values", **{"match[]": metric})


def grafana_expr(expr: str, instance_regex: str, rate_window: str) -> str:
    """Fill the variables as Grafana does: ``$instance`` is a regex of the selected values
    (used with ``=~``); ``$__rate_interval`` and friends are the window of the time range."""
    for var in ("$__rate_interval", "${__rate_interval}", "$__interval", "${__interval}",
                "$__range", "${__range}"):
        expr = expr.replace(var, rate_window)
    expr = expr.replace("${instance}", instance_regex).replace("$instance", instance_regex)
    assert "$" not in expr, f"a dashboard variable this test does not know: {expr}"
    return expr


def test_grafana_expr_substitution():
    assert grafana_expr('rate(x{instance=~"$instance"}[$__rate_interval])', "a:1", "90s") == \
        'rate(x{instance=~"a:1"}[90s])'
    with pytest.raises(AssertionError, match="does not know"):
        grafana_expr("x{a=\"$unknown\"}", "a", "1m")


def test_prometheus_config_comes_from_deploy(tmp_path):
    p = Prometheus(tmp_path, "127.0.0.1:9999")
    p.port = 1234
    cfg = p.config()
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["trivy-gateway"]["static_configs"][0]["targets"] == ["127.0.0.1:9999"]
    assert jobs["trivy-gateway"]["metrics_path"] == "/metrics"
    assert cfg["rule_files"] == [str(ALERTS)]


# ---------------------------------------------------------------------------------------------
# traffic
# ---------------------------------------------------------------------------------------------
def gateway_extra() -> dict:
    """Proxy auth on (for 407s), check.trivy.dev tunnelled (for tunnel bytes), a small cache
    budget (for evictions), prefetch of ``PREFETCHED`` every second (for the lifecycle panels;
    the harness switches prefetch off)."""
    defaults = yaml.safe_load((REPO / "gateway" / "default_config.yaml").read_text("utf-8"))
    rules = [{"host": "check.trivy.dev", "action": "tunnel"}] + [
        r for r in defaults["policy"]["rules"] if r["host"] != "check.trivy.dev"]
    return {"proxy": {"auth": {"enabled": True, "username": USER}},
            "policy": {"rules": rules},
            "cache": {"max_size": "16MiB"},
            "lifecycle": {"prefetch": {"enabled": True, "jitter": 0, "artifacts": {
                name: {"enabled": True, "interval": "1s"} if name == PREFETCHED
                else {"enabled": False}
                for name in defaults["lifecycle"]["prefetch"]["artifacts"]}}}}


def manifest_url(kind: str, registry: str = MIRROR) -> str:
    mirror_repo, ghcr_repo, tag = REPOSITORIES[kind]
    return f"https://{registry}/v2/{mirror_repo if registry == MIRROR else ghcr_repo}/manifests/{tag}"


def blob_url(kind: str, digest: str, registry: str = MIRROR) -> str:
    mirror_repo, ghcr_repo, _ = REPOSITORIES[kind]
    return f"https://{registry}/v2/{mirror_repo if registry == MIRROR else ghcr_repo}/blobs/{digest}"


async def raw_exchange(port: int, data: bytes, then: bytes = b"") -> bytes:
    """Send ``data`` on a new connection to the proxy; after its answer's head, send ``then``;
    read until the gateway closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if then:
            writer.write(then)
        rest = await asyncio.wait_for(reader.read(), 30)
        return head + rest
    finally:
        writer.close()


class Client:
    """aiohttp through the gateway as proxy, with the proxy credentials."""

    def __init__(self, gw, session: aiohttp.ClientSession) -> None:
        self.gw, self.session = gw, session

    async def get(self, url: str, *, headers=None, credentials=True, ssl_ctx=None):
        proxy_headers = {"Proxy-Authorization": PROXY_AUTH} if credentials else None
        async with self.session.get(url, proxy=self.gw.proxy_url, proxy_headers=proxy_headers,
                                    ssl=ssl_ctx or self.gw.client_ssl(), headers=headers or {},
                                    allow_redirects=False, auto_decompress=False) as r:
            return r.status, await r.read()


async def ordinary_traffic(c: Client, world) -> None:
    """What a fleet of scanners does: every artifact fetched, then hits; a 429 absorbed."""
    accept = {"Accept": MANIFEST_ACCEPT}
    # the tags of the vulnerability DB, Java DB and checks bundle; the first answer is a 429
    # with Retry-After, retried by the gateway
    throttled = world.too_many_requests(MIRROR, path="/manifests/", times=1, retry_after=1)
    for kind in ("db", "javadb", "checks", "db", "javadb", "checks"):
        status, _ = await c.get(manifest_url(kind), headers=accept)
        assert status == 200, kind
    world.faults.remove(throttled)  # not reached when the tags were still fresh in the cache
    # the VEX Hub archive, a missing POM (404, then a negative hit)
    for _ in range(2):
        status, _ = await c.get(f"https://{CODELOAD}/aquasecurity/vexhub/tar.gz/refs/heads/main")
        assert status == 200
        status, _ = await c.get(f"https://{MAVEN}/maven2/org/example/absent/1.0/absent-1.0.pom")
        assert status == 404
    # a blob through ghcr.io (307 to the CDN, followed by the gateway), then hits
    for _ in range(2):
        status, _ = await c.get(blob_url("javadb", world.digest("javadb", "layer"), GHCR))
        assert status == 200


async def rare_events(c: Client, world) -> None:
    """Each of the events a panel or an alert exists for, once."""
    # a corrupted body: never stored, the client is cut off; the next fetch is good
    world.corrupt_byte(MIRROR, 100, path="/blobs/", times=1)
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        await c.get(blob_url("checks", world.digest("checks", "layer")))
    status, _ = await c.get(blob_url("checks", world.digest("checks", "layer")))
    assert status == 200
    # DB versions of 1.5 MiB each, 21 MiB in all against a 16 MiB budget: evictions. The
    # first is cut mid-way and resumed with Range; the second answers 404 BLOB_UNKNOWN on
    # mirror.gcr.io and comes from its failover partner ghcr.io; the third gets a 429 first.
    for revision in range(100, 114):
        art = world.publish_db(revision, size_mib=1.5)
        if revision == 100:
            world.cut_after(MIRROR, 512 * 1024, path="/blobs/", times=1)
        if revision == 101:
            world.blob_unknown(MIRROR, times=1)
        if revision == 102:
            world.too_many_requests(MIRROR, path="/blobs/", times=1, retry_after=1)
        status, body = await c.get(blob_url("db", art.layer.digest))
        assert status == 200 and len(body) == art.layer.size, revision
    # a DB larger than the process may write to one file: the disk "fails" mid-fill, the
    # client is still served in full
    art = world.publish_db(200, size_mib=3)
    status, body = await c.get(blob_url("db", art.layer.digest))
    assert status == 200 and len(body) == art.layer.size
    # a blind tunnel (the world's own TLS, not the gateway's)
    status, _ = await c.get("https://check.trivy.dev/updates",
                            ssl_ctx=ssl.create_default_context(cafile=str(world.ca_pem)))
    assert status == 200
    # refused by policy
    with pytest.raises(aiohttp.ClientHttpProxyError) as denied:
        await c.get(f"https://{DENIED_HOST}/")
    assert denied.value.status == 403
    # no proxy credentials: 407
    with pytest.raises(aiohttp.ClientHttpProxyError) as unauthenticated:
        await c.get(f"https://{MAVEN}/maven2/", credentials=False)
    assert unauthenticated.value.status == 407
    # a malformed request
    answer = await raw_exchange(c.gw.proxy_port, b"NOT A REQUEST\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    # a client that does not speak TLS after CONNECT: a failed handshake
    answer = await raw_exchange(
        c.gw.proxy_port,
        f"CONNECT {MIRROR}:443 HTTP/1.1\r\nHost: {MIRROR}:443\r\n"
        f"Proxy-Authorization: {PROXY_AUTH}\r\n\r\n".encode(),
        then=b"GET / HTTP/1.1\r\n\r\n" * 20)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def prefetch_checks(gw) -> float:
    return gw.metric("trivy_gateway_prefetch_checks_total", artifact=PREFETCHED)


def wait_for_prefetch_check(gw, after: float, timeout: float = 60.0) -> float:
    """Poll (bounded) until ``PREFETCHED`` has been checked more than ``after`` times and
    serves a generation; return the count."""
    deadline = time.monotonic() + timeout
    while True:
        checks = prefetch_checks(gw)
        state = next(a for a in gw.status()["lifecycle"]["artifacts"]
                     if a["artifact"] == PREFETCHED)
        if checks > after and state["served_digest"]:
            return checks
        assert time.monotonic() < deadline, (f"no prefetch check of {PREFETCHED}: {state}\n"
                                             + gw.log_tail(30))
        time.sleep(0.2)


async def traffic(gw, world, *phases) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        c = Client(gw, session)
        for phase in phases:
            await phase(c, world)


# ---------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------
def test_every_dashboard_panel_returns_data_from_a_real_prometheus(
        clean_upstreams, make_gateway, prometheus, monkeypatch):
    world = clean_upstreams
    monkeypatch.setenv("TRIVY_GATEWAY_PROXY_PASSWORD", PASSWORD)
    gw = make_gateway(world, gateway_extra(), fsize_limit=FSIZE_LIMIT)
    admin_addr = gw.config["server"]["admin_listen"]
    prom = prometheus(admin_addr)
    t0 = time.time()

    def target_up():
        return [t for t in prom.api("targets")["activeTargets"]
                if t["labels"]["job"] == "trivy-gateway" and t["health"] == "up"]

    def scraped_since(moment: float) -> bool:
        """Prometheus holds a scrape started at least one interval after ``moment``."""
        result = prom.query('timestamp(up{job="trivy-gateway"})')
        return bool(result) and float(result[0]["value"][1]) >= moment + SCRAPE_INTERVAL

    assert prom.wait_for("first scrape", target_up), prom.api("targets")
    # the first generation of the prefetched artifact is cached before any client asks
    first_checks = wait_for_prefetch_check(gw, after=0)
    # a gateway that has been serving for a while (its series exist), then the events
    asyncio.run(traffic(gw, world, ordinary_traffic))
    mark = time.time()
    assert prom.wait_for("a scrape after the first traffic", lambda: scraped_since(mark)), \
        prom.log_tail()
    asyncio.run(traffic(gw, world, ordinary_traffic, rare_events))
    for name in ("trivy_gateway_upstream_failovers_total",
                 "trivy_gateway_upstream_resumed_downloads_total",
                 "trivy_gateway_cache_digest_mismatches_total",
                 "trivy_gateway_cache_store_errors_total", "trivy_gateway_cache_evictions_total",
                 "trivy_gateway_tls_handshake_errors_total", "trivy_gateway_tunnel_bytes_total",
                 "trivy_gateway_proxy_auth_failures_total", "trivy_gateway_denied_total"):
        assert gw.metric(name) > 0, (name, gw.log_tail())
    # a check during or after the traffic: increase() of the checks counter sees it
    wait_for_prefetch_check(gw, after=first_checks)
    mark = time.time()
    assert prom.wait_for("a scrape after the traffic", lambda: scraped_since(mark)), prom.log_tail()

    # the Gateway variable lists this gateway
    instances = instance_values(prom)
    assert instances == [admin_addr], instances
    # the dashboard's time range is this test's run: $__rate_interval spans all of its traffic
    window = f"{math.ceil(time.time() - t0) + 5}s"
    instance_regex = admin_addr.replace(".", "\\\\.")
    exprs = [(title, grafana_expr(e, instance_regex, window)) for title, e, _ in panel_exprs()]
    assert len(exprs) >= 30, exprs
    assert not MAY_BE_ZERO - {title for title, _ in exprs}, "MAY_BE_ZERO names a missing panel"

    results = {title: prom.query(expr) for title, expr in exprs}
    values = {title: [float(r["value"][1]) for r in res] for title, res in results.items()}
    print("PANELS " + json.dumps({t: [round(v, 4) for v in vs] for t, vs in values.items()}))
    empty = [f"{title}: {expr}" for title, expr in exprs if not results[title]]
    assert not empty, "dashboard expressions without data from a live gateway:\n" + "\n".join(empty)
    flat = [f"{title}: {values[title]} from {expr}" for title, expr in exprs
            if title not in MAY_BE_ZERO and not any(v > 0 for v in values[title])]
    assert not flat, "panels that do not show the traffic that flowed:\n" + "\n".join(flat)
    ages = next(res for title, res in results.items() if title.startswith("Trivy artifact age"))
    assert {r["metric"]["artifact"] for r in ages} == set(ARTIFACTS)

    # and drawn as Grafana draws a time series: a range query over the run with a 1 s step and
    # $__rate_interval = max(4 x scrape interval, step + scrape interval)
    rate_interval = f"{max(4 * SCRAPE_INTERVAL, 1 + SCRAPE_INTERVAL):g}s"
    end = time.time()
    drawn = {title: prom.query_range(grafana_expr(e, instance_regex, rate_interval), t0, end, 1)
             for title, e, instant in panel_exprs() if not instant}
    assert not [t for t, res in drawn.items() if not res], "time series panels without data"
    flat = [title for title, res in drawn.items() if title not in MAY_BE_ZERO and
            not any(float(v) > 0 for r in res for _, v in r["values"])]
    assert not flat, f"time series panels that never rise above 0 during the traffic: {flat}"

    # the alert rules evaluate against the live series without error
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

    # one corrupted blob raises the digest-mismatch alert (it has no `for`)
    def mismatch_alert():
        return [a for a in prom.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "TrivyGatewayDigestMismatches"
                and a["state"] == "firing"]
    firing = prom.wait_for("TrivyGatewayDigestMismatches firing", mismatch_alert, timeout=30)
    assert firing and firing[0]["labels"]["host"] == MIRROR, prom.api("alerts")
    # and nothing else: a gateway that served all of that is otherwise healthy
    others = [(a["labels"]["alertname"], a["state"]) for a in prom.api("alerts")["alerts"]
              if a["labels"]["alertname"] != "TrivyGatewayDigestMismatches"]
    assert not others, others


def test_rare_event_series_exist_at_zero_from_the_start():
    """The series of rare events are exported at 0 before the first event (without that 0
    sample Prometheus's increase() never sees the first one: see the module docstring)."""
    from prometheus_client import generate_latest

    from gateway.observability.metrics import CLIENT_ERROR_REASONS, Metrics
    from gateway.upstream.failover import Failover

    m = Metrics(["mirror.gcr.io", "*.wild.example"])
    m.add_known_hosts(["ghcr.io"])
    Failover([["mirror.gcr.io/aquasec/trivy-db", "ghcr.io/aquasecurity/trivy-db"]], m)
    text = generate_latest(m.registry).decode()
    for series in [
        'trivy_gateway_cache_digest_mismatches_total{host="mirror.gcr.io"} 0.0',
        'trivy_gateway_cache_digest_mismatches_total{host="ghcr.io"} 0.0',
        'trivy_gateway_upstream_resumed_downloads_total{host="ghcr.io"} 0.0',
        'trivy_gateway_upstream_failovers_total{from_host="mirror.gcr.io",to_host="ghcr.io"} 0.0',
        'trivy_gateway_upstream_failovers_total{from_host="ghcr.io",to_host="mirror.gcr.io"} 0.0',
        'trivy_gateway_served_bytes_total{source="cache"} 0.0',
        'trivy_gateway_tunnel_bytes_total{direction="upstream"} 0.0',
        'trivy_gateway_cache_store_errors_total{reason="io_error"} 0.0',
        'trivy_gateway_denied_total{host="other",reason="not_allowed"} 0.0',
        *(f'trivy_gateway_client_errors_total{{reason="{r}"}} 0.0' for r in CLIENT_ERROR_REASONS),
    ]:
        assert series in text, series
    assert "wild.example" not in text  # wildcards are not hosts
