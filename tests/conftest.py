"""Shared fixtures: one emulated upstream world per test session, gateways per test."""
from __future__ import annotations

import pytest

from tests.emulated.world import WorldThread
from tests.gateway_harness import GatewayProcess


@pytest.fixture(scope="session")
def upstreams(tmp_path_factory):
    """The emulated internet (registries, CDN, GitHub, Maven), shared by the whole session."""
    wt = WorldThread(tmp_path_factory.mktemp("upstreams"))
    wt.start()
    try:
        yield wt
    finally:
        wt.stop()


@pytest.fixture
def clean_upstreams(upstreams):
    """The world with no faults and an empty access log; restores published artifacts after."""
    upstreams.clear_faults()
    upstreams.clear_log()
    published = dict(upstreams.published)
    yield upstreams
    upstreams.clear_faults()
    for host in upstreams.hosts:
        if not upstreams.is_listening(host):
            upstreams.accept(host)
    for kind, art in published.items():
        if upstreams.published.get(kind) is not art:
            upstreams.publish(kind, art)


@pytest.fixture
def make_gateway(tmp_path):
    """Factory: ``make_gateway(world, extra_config)`` → a started gateway subprocess."""
    started: list[GatewayProcess] = []

    def factory(world=None, extra=None, data_dir=None, name="gw", **kw) -> GatewayProcess:
        gw = GatewayProcess(tmp_path / f"{name}{len(started)}", world, extra, data_dir, **kw)
        started.append(gw)
        return gw.start()

    yield factory
    for gw in started:
        code = gw.stop()
        # shown by pytest only when the test failed
        print(f"--- gateway {gw.workdir.name} exit={code} log tail ---\n{gw.log_tail(40)}")
