"""Counter increments of the per-request path are deferred (plain numbers) until the registry
is collected: every reader of the registry still sees every increment made before it."""
from __future__ import annotations

from prometheus_client import generate_latest

from gateway.observability.metrics import Metrics


def test_deferred_increments_are_visible_to_every_registry_reader():
    m = Metrics(["repo.maven.apache.org"])
    child = m.requests.labels(host="repo.maven.apache.org", decision="intercept", status="200",
                              door="proxy")
    for _ in range(3):
        m.deferred.add(child)
    m.deferred.add(m.served_bytes.labels(source="cache"), 4096)
    labels = dict(host="repo.maven.apache.org", decision="intercept", status="200", door="proxy")
    # a sample read (what tests and the status code use) and a scrape both flush first
    assert m.registry.get_sample_value("trivy_gateway_requests_total", labels) == 3
    text = generate_latest(m.registry).decode()
    assert 'trivy_gateway_served_bytes_total{source="cache"} 4096.0' in text
    # nothing is counted twice by repeated collection
    m.deferred.add(child)
    assert m.registry.get_sample_value("trivy_gateway_requests_total", labels) == 4
    assert m.registry.get_sample_value("trivy_gateway_requests_total", labels) == 4


def test_deferred_observations_give_the_samples_observe_gives():
    """The request-duration histogram is observed through the deferred counts: after a flush
    its buckets, sum and count are exactly what ``observe`` makes of the same values —
    including values equal to a bucket's bound (``le`` is inclusive), zero, and beyond the
    last finite bound."""
    deferred, direct = Metrics(["h"]), Metrics(["h"])
    values = [0.0, 0.0001, 0.005, 0.0050001, 0.01, 0.3, 1.0, 2.5, 7.0, 1e6]
    labels = dict(host="h", decision="intercept", status="200", door="proxy")
    for v in values:                             # the proxy's form: a request and its duration
        deferred.deferred.add(deferred.requests.labels(**labels))
        deferred.deferred.observe(deferred.request_duration.labels(host="h"), v)
        direct.requests.labels(**labels).inc()
        direct.request_duration.labels(host="h").observe(v)
    names = ("trivy_gateway_request_duration_seconds_bucket",
             "trivy_gateway_request_duration_seconds_sum",
             "trivy_gateway_request_duration_seconds_count", "trivy_gateway_requests_total")

    def samples(m: Metrics) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for metric in m.registry.collect() for s in metric.samples if s.name in names}

    got, want = samples(deferred), samples(direct)
    assert got == want
    assert want[("trivy_gateway_request_duration_seconds_count", (("host", "h"),))] == len(values)
    # a second collection adds nothing
    assert samples(deferred) == want
