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
