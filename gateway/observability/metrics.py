"""The metrics catalogue: every Prometheus series the gateway exports, defined in one place.

Why one object instead of module-level globals: tests start several gateways in one process, and
each needs its own :class:`CollectorRegistry`. Every layer receives the :class:`Metrics` instance it
is given; nothing registers collectors on the global default registry.

Label sets are bounded by construction: hosts go through :meth:`Metrics.host_label`, which folds
any host not named in the configuration into ``"other"``; no URL, path or digest is ever a label.
``docs/metrics.md`` is checked against :data:`CATALOGUE` by a test.
"""
from __future__ import annotations

from bisect import bisect_left
from enum import StrEnum
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

PREFIX = "trivy_gateway_"

#: artifacts whose served age is exported (trivy_gateway_artifact_age_seconds{artifact=...})
ARTIFACTS = ("vulnerability_db", "java_db", "checks_bundle", "vex_hub")


class CacheResult(StrEnum):
    """What the cache did for one request: the ``result`` label of
    trivy_gateway_cache_requests_total and the ``cache`` field of the access log."""

    HIT = "hit"
    MISS = "miss"
    STALE = "stale"
    COALESCED = "coalesced"
    NEGATIVE = "negative"
    REVALIDATED = "revalidated"
    BYPASS = "bypass"
    ERROR = "error"


#: values of the ``result`` label of trivy_gateway_cache_requests_total
CACHE_RESULTS = tuple(r.value for r in CacheResult)
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}

# Label values known in advance, exported at 0 from the start. Prometheus's rate() and increase()
# see nothing of a series that first appears already at 1, so without a 0 sample before it the
# first digest mismatch, refused connection or failover after a restart would never fire its
# alert or show on the dashboard (tests/test_prometheus_live.py).
#: ``reason`` of trivy_gateway_client_errors_total
CLIENT_ERROR_REASONS = ("malformed", "bad_target", "not_proxy_request", "early_data",
                        "header_timeout", "header_too_large", "disconnected",
                        "too_many_connections", "too_many_connections_per_client",
                        "first_byte_timeout", "auth_locked_out", "bad_host", "misdirected")
#: ``reason`` of trivy_gateway_cache_store_errors_total
STORE_ERROR_REASONS = ("disk_full", "io_error")
#: ``role`` of trivy_gateway_fleet_fills_total
FLEET_ROLES = ("led", "followed", "s3", "peer", "takeover")
#: ``reason`` of trivy_gateway_denied_total
DENY_REASONS = ("not_allowed", "rule", "ssrf", "port")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60)
_RETRY_AFTER_BUCKETS = (0.001, 0.1, 1, 5, 10, 30, 60, 300, 900, 1800, 3600)


class DeferredCounts:
    """Counter increments and histogram observations of the per-request path, kept as plain
    numbers until collection.

    Why: prometheus_client's ``inc()`` checks the value and takes a lock on every call (~0.7 µs
    here) and a small cache hit makes three of them (requests, cache requests, bytes served),
    a noticeable part of what the hit costs. :meth:`add` is a dict update instead. The sums
    reach the real counters in :meth:`flush`, which runs before anything reads them: this
    object is the first collector of the gateway's registry, and a registry collects in the
    order collectors were registered, so a scrape, the status page or a test reading a sample
    always sees every increment made before it. Code that reads one metric's ``collect()``
    directly calls :meth:`flush` first. Single-threaded by design: the event loop's thread
    adds and flushes.
    """

    def __init__(self) -> None:
        self._pending: dict[object, float] = {}
        #: histogram child -> [its upper bounds, a count per bucket, the sum]
        self._observed: dict[object, list] = {}

    def add(self, counter, amount: float = 1) -> None:
        """Add ``amount`` to ``counter`` (a labelled prometheus_client Counter child)."""
        pending = self._pending
        pending[counter] = pending.get(counter, 0) + amount

    def observe(self, histogram, amount: float) -> None:
        """``histogram.observe(amount)`` (a labelled Histogram child, no exemplar), kept as a
        bucket count: the first bucket whose upper bound is >= ``amount``, as ``observe``
        picks it."""
        slot = self._observed.get(histogram)
        if slot is None:
            bounds = histogram._upper_bounds             # noqa: SLF001 - see flush()
            slot = self._observed[histogram] = [bounds, [0] * len(bounds), 0.0]
        slot[1][bisect_left(slot[0], amount)] += 1
        slot[2] += amount

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for counter, amount in pending.items():
            counter.inc(amount)
        observed, self._observed = self._observed, {}
        for histogram, (_bounds, counts, total) in observed.items():
            # what observe() does per call, once per bucket: the child's sum and bucket values
            # (prometheus_client's Histogram keeps them as _sum and _buckets; a test pins it)
            histogram._sum.inc(total)                    # noqa: SLF001
            buckets = histogram._buckets                 # noqa: SLF001
            for i, n in enumerate(counts):
                if n:
                    buckets[i].inc(n)

    # the collector protocol: nothing of its own to expose; collecting flushes
    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self.flush()
        return []


class Metrics:
    """All collectors of one gateway instance, on their own registry."""

    def __init__(self, known_hosts: Iterable[str] = (), registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        #: registered before every metric, so it flushes before any of them is collected
        self.deferred = DeferredCounts()
        self.registry.register(self.deferred)  # type: ignore[arg-type]
        self._known_hosts = {h.lower() for h in known_hosts if h and "*" not in h}
        #: grows by one whenever a host becomes known (its label stops being ``other``): a
        #: cache of labels (or of labelled children) keyed by host is valid while it is the same
        self.host_labels_generation = 0
        r = self.registry
        p = PREFIX

        # -- client-facing proxy ----------------------------------------------------------
        self.build_info = Info(p + "build", "Version of the running gateway.", registry=r)
        self.config_info = Info(
            p + "config", "The active configuration: digest (as in check-config and the "
            "config_reloaded log line; secrets excluded) and source file.", registry=r)
        self.config_reloads = Counter(
            p + "config_reloads_total",
            "Live reloads (SIGHUP, trivy-gateway reload), by result (applied, refused: the new "
            "configuration was invalid and the running one stayed).", ["result"], registry=r)
        self.requests = Counter(
            p + "requests_total",
            "Client requests handled, by target host, policy decision, response status and "
            "door (proxy: HTTPS_PROXY clients; mirror: registry/Maven/VEX mirror clients).",
            ["host", "decision", "status", "door"], registry=r)
        self.request_duration = Histogram(
            p + "request_duration_seconds",
            "Time from a client request's head to the end of its response, by target host.",
            ["host"], buckets=_LATENCY_BUCKETS, registry=r)
        self.active_connections = Gauge(
            p + "active_connections",
            "Open client connections, by kind (client: plain proxy connection; intercepted: "
            "TLS terminated by the gateway; tunnel: bytes relayed blind; mirror: a mirror-door "
            "connection).",
            ["kind"], registry=r)
        self.denied = Counter(
            p + "denied_total",
            "Requests and CONNECTs refused by policy, by host (unconfigured hosts fold into "
            "'other') and reason (not_allowed, rule, ssrf, port).",
            ["host", "reason"], registry=r)
        self.proxy_auth_failures = Counter(
            p + "proxy_auth_failures_total",
            "Requests refused with 407 because Proxy-Authorization was missing or wrong.", registry=r)
        self.client_errors = Counter(
            p + "client_errors_total",
            "Malformed or aborted client requests, by reason.", ["reason"], registry=r)
        self.tunnel_bytes = Counter(
            p + "tunnel_bytes_total",
            "Bytes relayed through blind tunnels, by direction (upstream, downstream).",
            ["direction"], registry=r)

        # -- TLS --------------------------------------------------------------------------
        self.leaf_certs_minted = Counter(
            p + "tls_leaf_certificates_minted_total",
            "Leaf certificates minted for intercepted hosts (cache misses of the leaf LRU).",
            registry=r)
        self.tls_handshake_errors = Counter(
            p + "tls_handshake_errors_total",
            "Client TLS handshakes with the gateway that failed (often: the client does not "
            "trust the gateway CA).", registry=r)

        # -- cache --------------------------------------------------------------------------
        self.cache_requests = Counter(
            p + "cache_requests_total",
            "Client requests (proxy and mirror door) through the cache, by upstream host, "
            "artifact kind (oci_blob, oci_manifest, oci_auth, maven, github, generic) and cache "
            "result (" + ", ".join(CACHE_RESULTS) + "); the prefetcher's own requests are in "
            "trivy_gateway_prefetch_cache_requests_total.",
            ["host", "kind", "result"], registry=r)
        self.served_bytes = Counter(
            p + "served_bytes_total",
            "Response body bytes sent to clients, by source (cache, upstream).",
            ["source"], registry=r)
        self.cache_size_bytes = Gauge(
            p + "cache_size_bytes", "Bytes of cached bodies on disk.", registry=r)
        self.cache_max_size_bytes = Gauge(
            p + "cache_max_size_bytes", "Configured disk budget of the cache.", registry=r)
        self.cache_entries = Gauge(
            p + "cache_entries", "Cached objects (blobs and response entries).", ["type"], registry=r)
        self.cache_evictions = Counter(
            p + "cache_evictions_total", "Cached blobs removed to stay within the disk budget.",
            registry=r)
        self.cache_digest_mismatches = Counter(
            p + "cache_digest_mismatches_total",
            "Upstream bodies whose sha256 did not match the digest requested (never stored).",
            ["host"], registry=r)
        self.cache_store_errors = Counter(
            p + "cache_store_errors_total",
            "Failures to store a response (disk full, I/O error); the client is still served.",
            ["reason"], registry=r)
        self.cache_fills_in_flight = Gauge(
            p + "cache_fills_in_flight", "Upstream fetches currently being written to the cache.",
            registry=r)
        self.artifact_age = Gauge(
            p + "artifact_age_seconds",
            "Age of the Trivy artifact most recently served (time since the gateway last got it "
            "fresh from upstream); grows while stale content hides an upstream outage.",
            ["artifact"], registry=r)

        # -- artifact lifecycle (prefetch, freshness); artifact = a lifecycle.prefetch key ---
        self.prefetch_checks = Counter(
            p + "prefetch_checks_total",
            "Prefetch checks of a watched artifact's tag, by result (unchanged, fetched: a new "
            "generation is now cached, failed, denied: the allowlist does not intercept it).",
            ["artifact", "result"], registry=r)
        self.prefetch_cache_requests = Counter(
            p + "prefetch_cache_requests_total",
            "Requests the prefetcher sent through the cache, by upstream host, kind and cache "
            "result (as trivy_gateway_cache_requests_total, which counts clients only): its "
            "misses fetch new generations before any client asks.",
            ["host", "kind", "result"], registry=r)
        self.prefetch_bytes = Counter(
            p + "prefetch_bytes_total",
            "Bytes of new generations fetched by the prefetcher (before any client asked).",
            ["artifact"], registry=r)
        self.prefetch_consecutive_failures = Gauge(
            p + "prefetch_consecutive_failures",
            "Prefetch checks of this artifact that failed in a row (0 after a success).",
            ["artifact"], registry=r)
        self.prefetch_last_success = Gauge(
            p + "prefetch_last_success_timestamp_seconds",
            "Unix time of the last successful prefetch check of this artifact.",
            ["artifact"], registry=r)
        self.artifact_upstream_newer = Gauge(
            p + "artifact_upstream_newer",
            "1 while the upstream tag points at a generation the gateway does not serve yet "
            "(not completely cached), else 0.",
            ["artifact"], registry=r)
        self.artifact_served_age = Gauge(
            p + "artifact_served_age_seconds",
            "Age of the generation the gateway serves for this artifact (from the manifest's "
            "org.opencontainers.image.created annotation, else since the gateway first saw it); "
            "updated on every prefetch check.",
            ["artifact"], registry=r)

        # -- upstream ---------------------------------------------------------------------
        self.upstream_responses = Counter(
            p + "upstream_responses_total",
            "Responses received from upstreams, by host and status (errors: status 'error').",
            ["host", "status"], registry=r)
        self.upstream_latency = Histogram(
            p + "upstream_request_duration_seconds",
            "Time to response headers from an upstream, by host.",
            ["host"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_retries = Counter(
            p + "upstream_retries_total",
            "Upstream requests retried, by host and reason (connect, timeout, status_429 "
            "(429, or 403 with Retry-After), status_5xx, body).", ["host", "reason"], registry=r)
        self.upstream_retry_after = Histogram(
            p + "upstream_retry_after_seconds",
            "Retry-After values received from upstreams (as sent, before flooring/capping).",
            ["host"], buckets=_RETRY_AFTER_BUCKETS, registry=r)
        self.upstream_queue_wait = Histogram(
            p + "upstream_queue_wait_seconds",
            "Time requests waited for the per-host rate limiter and concurrency cap.",
            ["host"], buckets=_WAIT_BUCKETS, registry=r)
        self.upstream_queue_depth = Gauge(
            p + "upstream_queue_depth", "Requests waiting for the per-host limiter.", ["host"],
            registry=r)
        self.upstream_rate = Gauge(
            p + "upstream_rate_limit_per_second",
            "Current allowed request rate per host (lowered on 429, recovers gradually).",
            ["host"], registry=r)
        self.upstream_connections = Gauge(
            p + "upstream_active_requests", "Requests in flight to each upstream host.", ["host"],
            registry=r)
        self.circuit_state = Gauge(
            p + "upstream_circuit_state",
            "Circuit breaker state per upstream host: 0 closed, 1 half-open, 2 open.",
            ["host"], registry=r)
        self.failovers = Counter(
            p + "upstream_failovers_total",
            "Requests answered from an equivalent repository after the requested one failed.",
            ["from_host", "to_host"], registry=r)
        self.resumed_downloads = Counter(
            p + "upstream_resumed_downloads_total",
            "Upstream bodies cut mid-way and resumed with a Range request.", ["host"], registry=r)

        # -- replicas acting as one cache (gateway/shared/, docs/scale-out.md) ----------------
        self.shared_backend_up = Gauge(
            p + "shared_backend_up",
            "1 while the shared backend (redis, s3) answers, 0 while this replica works without "
            "it (local tier + upstream); absent when not configured.", ["backend"], registry=r)
        self.fleet_fills = Counter(
            p + "fleet_fills_total",
            "Fills on this replica by source: led (fetched from the upstream under the fleet "
            "lease), followed (streamed from the leading replica), s3 (read from the shared "
            "store), peer (read from another replica's local tier), takeover (the leader died; "
            "resumed or refetched here).", ["role"], registry=r)
        self.shared_store_bytes = Counter(
            p + "shared_store_bytes_total",
            "Bytes this replica moved to (upload) or from (download) the shared S3 store.",
            ["direction"], registry=r)
        self.fleet_circuit_events = Counter(
            p + "fleet_circuit_events_total",
            "Circuit openings shared through Redis: sent (opened here) or received (opened here "
            "because another replica's opened).", ["direction"], registry=r)
        self.fleet_budget_wait = Histogram(
            p + "fleet_budget_wait_seconds",
            "Time an upstream request waited for a token of the host's fleet budget (Redis).",
            ["host"], buckets=_WAIT_BUCKETS, registry=r)

        self.cache_max_size_bytes.set(0)
        for role in FLEET_ROLES:
            self.fleet_fills.labels(role=role)
        for direction in ("upload", "download"):
            self.shared_store_bytes.labels(direction=direction)
        for direction in ("sent", "received"):
            self.fleet_circuit_events.labels(direction=direction)
        for source in ("cache", "upstream"):
            self.served_bytes.labels(source=source)
        for direction in ("upstream", "downstream"):
            self.tunnel_bytes.labels(direction=direction)
        for reason in CLIENT_ERROR_REASONS:
            self.client_errors.labels(reason=reason)
        for reason in STORE_ERROR_REASONS:
            self.cache_store_errors.labels(reason=reason)
        self.denied.labels(host="other", reason="not_allowed")
        self._zero_host_series(self._known_hosts)

    # -----------------------------------------------------------------------------------
    def add_known_hosts(self, hosts: Iterable[str]) -> None:
        new = {h.lower() for h in hosts if h and "*" not in h} - self._known_hosts
        if new:
            self._known_hosts.update(new)
            self.host_labels_generation += 1
        self._zero_host_series(new)

    def add_failover_pair(self, from_host: str, to_host: str) -> None:
        """Export trivy_gateway_upstream_failovers_total for a configured pair at 0."""
        self.failovers.labels(from_host=self.host_label(from_host), to_host=self.host_label(to_host))

    def _zero_host_series(self, hosts: Iterable[str]) -> None:
        """Per-host counters of rare events that an alert or a panel must see from the first."""
        for host in hosts:
            self.cache_digest_mismatches.labels(host=host)
            self.resumed_downloads.labels(host=host)

    def host_label(self, host: str | None) -> str:
        """A bounded label value: configured hosts by name, anything else as ``other``."""
        if not host:
            return "other"
        host = host.lower()
        return host if host in self._known_hosts else "other"


def catalogue() -> dict[str, dict]:
    """Name → {type, help, labels} for every exported metric (used for docs and tests)."""
    m = Metrics()
    out: dict[str, dict] = {}
    for collector in list(m.registry._collector_to_names):  # noqa: SLF001 - no public API for this
        for family in collector.describe():
            labels = list(getattr(collector, "_labelnames", ()))
            name = family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
            out[name] = {"type": family.type, "help": family.documentation, "labels": labels}
    return dict(sorted(out.items()))
