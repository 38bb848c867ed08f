"""Registries on non-default ports (issue 10, "Also"): ``registry.test:5443`` is a registry of its
own — classified, pinged, given tokens, cached, failed over to and labelled as ``host:port``.

The emulated world runs that registry on a loopback port reached through
``upstream.address_overrides["registry.test:5443"]`` and the world's CA, like every other
emulated host; the real gateway (subprocess) sits in between; the last test drives the real
Trivy 0.76 with ``--db-repository registry.test:5443/aquasec/trivy-db:2``.
"""
from __future__ import annotations

import base64
import json

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict

from gateway.exchange import Exchange
from gateway.settings import ConfigError, CredentialSettings, default_config_text, load_settings
from tests.e2e_support import TrivyClient, blob_requests, diag, require_trivy
from tests.emulated.world import GHCR, MIRROR, PORTED
from tests.test_gateway_cache import MANIFEST_ACCEPT, get, sha
from upstream_support import GET, FakeServer, new_client, pki, sample, settings, stop_all  # noqa: F401

DB_REPO = "aquasec/trivy-db"          # the ported registry uses mirror.gcr.io's names
GHCR_DB_REPO = "aquasecurity/trivy-db"


def ported_config(failover: bool = True) -> dict:
    """The default configuration plus registry.test:5443 everywhere an operator would add it
    (lists replace on merge, so each list is the default one extended)."""
    base = yaml.safe_load(default_config_text())
    rules = base["policy"]["rules"] + [
        {"host": "registry.test", "action": "intercept", "ports": [5443]}]
    oci = base["cache"]["oci"]
    groups = [g for g in base["upstream"]["failover_groups"]
              if f"{GHCR}/{GHCR_DB_REPO}" not in g]
    if failover:
        groups.append([f"{PORTED}/{DB_REPO}", f"{GHCR}/{GHCR_DB_REPO}"])
    return {
        "policy": {"rules": rules},
        "cache": {"oci": {"registries": oci["registries"] + [PORTED],
                          "public_repositories": oci["public_repositories"]
                          + [f"{PORTED}/{DB_REPO}"]}},
        "upstream": {"failover_groups": groups},
    }


async def token_dance(gw, session, registry: str, repo: str) -> str:
    """What Trivy does first: ``/v2/`` ping, then the token at the realm it names."""
    status, headers, _ = await get(gw, f"https://{registry}/v2/", session=session)
    assert status == 401, headers
    challenge = headers["WWW-Authenticate"]
    assert f'realm="https://{registry}/' in challenge, challenge
    realm = challenge.split('realm="', 1)[1].split('"', 1)[0]
    status, _, body = await get(
        gw, f"{realm}?scope=repository:{repo}:pull&service={registry}", session=session)
    assert status == 200, body[:300]
    return json.loads(body)["token"]


async def pull_db(gw, world, registry: str = PORTED, repo: str = DB_REPO):
    """Ping, token, manifest by tag, layer blob through the gateway; returns the Cache-Status
    of the manifest and the blob."""
    async with aiohttp.ClientSession() as s:
        token = await token_dance(gw, s, registry, repo)
        auth = {"Authorization": f"Bearer {token}"}
        status, mh, manifest = await get(gw, f"https://{registry}/v2/{repo}/manifests/2",
                                         headers={**auth, "Accept": MANIFEST_ACCEPT}, session=s)
        assert status == 200, manifest[:300]
        assert sha(manifest) == world.digest("db")
        layer = json.loads(manifest)["layers"][0]["digest"]
        status, bh, blob = await get(gw, f"https://{registry}/v2/{repo}/blobs/{layer}",
                                     headers=auth, session=s)
        assert status == 200, blob[:300]
        assert sha(blob) == world.digest("db", "layer")
    return mh["Cache-Status"], bh["Cache-Status"]


# --------------------------------------------------------------------------------------------
# pure pieces: spelling, classification, failover lookup, configuration errors
# --------------------------------------------------------------------------------------------
def test_registry_identity_classification_and_failover_keep_the_port():
    from gateway.hostport import canonical_authority, url_authority

    assert url_authority("https://Registry.Test:5443/v2/") == "registry.test:5443"
    assert url_authority("https://registry.test:443/v2/") == "registry.test"
    assert url_authority("https://[::1]:5000/v2/") == "[::1]:5000"
    assert canonical_authority("registry.test:443") == "registry.test"
    assert canonical_authority("REGISTRY.corp:5000") == "registry.corp:5000"
    # what the pipeline classifies with: the exchange's authority, port included
    ex = Exchange("GET", "https", "registry.test", 5443, "/v2/", CIMultiDict())
    assert ex.authority == PORTED
    assert Exchange("GET", "https", "registry.test", 443, "/v2/", CIMultiDict()).authority \
        == "registry.test"

    from gateway.resources import classify
    from gateway.upstream.failover import equivalents

    s = load_settings(env={}, overrides=ported_config())
    res = classify("GET", PORTED, f"/v2/{DB_REPO}/manifests/2", "", {"accept": MANIFEST_ACCEPT},
                   s.cache, scheme="https")
    assert res.kind == "oci_manifest" and res.registry == PORTED and res.public
    assert PORTED in res.cache_key
    ping = classify("GET", PORTED, "/v2/", "", {}, s.cache, scheme="https")
    assert ping.kind == "oci_auth" and ping.cache_key == f"oci-ping|https://{PORTED}/v2/|GET"
    # the same host on 443 is another registry: not configured, so not OCI
    assert classify("GET", "registry.test", "/v2/", "", {}, s.cache, scheme="https").kind != "oci_auth"
    groups = s.upstream.failover_groups
    assert equivalents(groups, GHCR, GHCR_DB_REPO) == [(PORTED, DB_REPO)]
    assert equivalents(groups, PORTED, DB_REPO) == [(GHCR, GHCR_DB_REPO)]
    assert equivalents(groups, "registry.test", DB_REPO) == []


@pytest.mark.parametrize("override, key, hint", [
    ({"cache": {"oci": {"registries": ["registry.test:443"]}}}, "cache.oci.registries[0]",
     "'registry.test'"),
    ({"cache": {"oci": {"registries": ["https://registry.test:5443"]}}}, "cache.oci.registries[0]",
     "without a scheme"),
    ({"cache": {"oci": {"registries": ["registry.test:99999"]}}}, "cache.oci.registries[0]",
     "bad port"),
    ({"cache": {"oci": {"public_repositories": ["Registry.Test:5443/a/b"]}}},
     "cache.oci.public_repositories[0]", "'registry.test:5443'"),
    ({"upstream": {"failover_groups": [["ghcr.io/a/b", "registry.test:5443"]]}},
     "upstream.failover_groups[0][1]", "registry/repository"),
    ({"policy": {"rules": [{"host": "registry.test:5443"}]}}, "policy.rules[0].host",
     "host: registry.test, ports: [5443]"),
])
def test_registry_spelling_errors_name_the_key(override, key, hint):
    with pytest.raises(ConfigError) as exc:
        load_settings(env={}, overrides=override)
    assert key in str(exc.value) and hint in str(exc.value)


async def test_same_host_other_port_is_another_origin_for_credentials_and_circuits(pki):
    """reg.test:5443 and reg.test (443) are two upstreams: a credential for one is not sent to
    the other, a redirect between them drops Authorization, and each has its own circuit."""
    async def ported(request, srv):
        if request.path == "/hop":
            return web.Response(status=307, headers={"Location": "https://reg.test/landing"})
        return web.Response(text="ported")

    async def default(request, srv):
        return web.Response(text="default")

    a = await FakeServer(pki, ["reg.test"], ported).start()
    b = await FakeServer(pki, ["reg.test"], default).start()
    cred = CredentialSettings(host="reg.test:5443", type="bearer", secret_env="X", secret="tok")
    client, metrics = new_client(
        settings({"reg.test:5443": a.addr, "reg.test": b.addr}, pki.ca_file, credentials=(cred,)),
        ["reg.test:5443", "reg.test"])
    await client.start()
    try:
        assert await (await client.request(GET("https://reg.test:5443/v2/"))).read() == b"ported"
        assert a.log[-1].headers.get("Authorization") == "Bearer tok"
        assert a.log[-1].host == "reg.test:5443"
        assert await (await client.request(GET("https://reg.test/v2/"))).read() == b"default"
        assert "Authorization" not in b.log[-1].headers
        resp = await client.request(GET("https://reg.test:5443/hop", follow_redirects=True,
                                        headers={"Authorization": "Bearer client"}))
        assert await resp.read() == b"default"
        assert "Authorization" not in b.log[-1].headers   # another origin: not carried over
        assert set(client.health()) == {"reg.test:5443", "reg.test"}
        assert sample(metrics, "trivy_gateway_upstream_responses_total",
                      host="reg.test:5443", status="200") == 1
    finally:
        await client.close()
        await stop_all(a, b)


# --------------------------------------------------------------------------------------------
# the real gateway against registry.test:5443
# --------------------------------------------------------------------------------------------
async def test_cold_then_warm_db_pull_from_registry_on_port_5443(clean_upstreams, make_gateway,
                                                                 monkeypatch):
    world = clean_upstreams
    # a credential for registry.test:5443 (exact host:port) goes with the gateway's token request
    monkeypatch.setenv("PORTED_REGISTRY_SECRET", "s3cret")
    cfg = ported_config()
    cfg["upstream"]["credentials"] = [{"host": PORTED, "type": "basic", "username": "scanner",
                                       "secret_env": "PORTED_REGISTRY_SECRET"}]
    gw = make_gateway(world, cfg)
    manifest_cs, blob_cs = await pull_db(gw, world)
    assert "fwd=uri-miss" in manifest_cs and "fwd=uri-miss" in blob_cs
    world.wait_idle(5)
    # everything reached the registry on 5443 (the gateway's own token flow included): the
    # ping without its port would have gone to registry.test:443, which does not exist
    assert {e.host for e in world.requests()} == {PORTED}, world.log_summary()
    layer = world.digest("db", "layer")
    blobs = world.requests(host=PORTED, path_contains="/blobs/")
    assert [(b.status, b.path.endswith(layer)) for b in blobs] == [(200, True)]
    # the challenge of the client's ping was kept under registry.test:5443: no second ping
    assert len(world.requests(host=PORTED, path_regex=r"^/v2/?$")) == 1, world.log_summary()
    # the gateway fetched with its own registry token, obtained from registry.test:5443
    gw_tokens = [e for e in world.requests(host=PORTED, path_contains="/v2/token")
                 if "trivy-gateway" in (e.request_headers.get("user-agent") or "")]
    assert len(gw_tokens) == 1, world.log_summary()
    basic = "Basic " + base64.b64encode(b"scanner:s3cret").decode()
    assert gw_tokens[0].request_headers.get("authorization") == basic
    assert gw.metric("trivy_gateway_upstream_responses_total", host=PORTED) >= 3

    world.clear_log()
    manifest_cs, blob_cs = await pull_db(gw, world)
    assert manifest_cs.startswith("trivy-gateway; hit") and blob_cs.startswith("trivy-gateway; hit")
    assert world.requests() == [], "a warm pull reached the upstream:\n" + world.log_summary()
    assert gw.metric("trivy_gateway_cache_requests_total", host=PORTED, kind="oci_manifest",
                     result="hit") == 1
    # /api/status shows the registry under its own name (host:port), not as "registry.test"
    assert PORTED in gw.status()["upstreams"] and "registry.test" not in gw.status()["upstreams"]


async def test_failover_away_from_registry_on_port_5443(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world, ported_config())
    world.service_unavailable(PORTED, path="/manifests/", times=None)
    async with aiohttp.ClientSession() as s:
        status, headers, manifest = await get(
            gw, f"https://{PORTED}/v2/{DB_REPO}/manifests/2",
            headers={"Accept": MANIFEST_ACCEPT}, session=s)
    assert status == 200, manifest[:300]
    assert sha(manifest) == world.digest("db")
    world.wait_idle(5)
    assert [e.status for e in world.requests(host=GHCR, path_contains="/manifests/")] == [200]
    assert gw.metric("trivy_gateway_upstream_failovers_total", from_host=PORTED, to_host=GHCR) == 1


async def test_failover_to_registry_on_port_5443(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world, ported_config())
    world.blob_unknown(GHCR, times=None)
    layer = world.digest("db", "layer")
    status, headers, blob = await get(gw, f"https://{GHCR}/v2/{GHCR_DB_REPO}/blobs/{layer}")
    assert status == 200, blob[:300]
    assert sha(blob) == layer
    world.wait_idle(5)
    # the failover member was pinged and asked for a token on its own port, then the blob came
    # from there
    assert [e.status for e in world.requests(host=PORTED, path_contains="/blobs/")] == [200]
    assert [e.path for e in world.requests(host=PORTED, path_regex=r"^/v2/$")] == ["/v2/"]
    assert gw.metric("trivy_gateway_upstream_failovers_total", from_host=GHCR, to_host=PORTED) == 1
    # its circuit, limiter and metrics are those of registry.test:5443, not of "registry.test"
    assert gw.metric("trivy_gateway_upstream_responses_total", host=PORTED, status="200") >= 2
    assert gw.metric("trivy_gateway_upstream_responses_total", host="other") == 0


# --------------------------------------------------------------------------------------------
# the real Trivy
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_trivy_db_repository_with_port_cold_then_warm(clean_upstreams, make_gateway, tmp_path):
    require_trivy()
    world = clean_upstreams
    gw = make_gateway(world, ported_config(failover=False))
    t = TrivyClient(gw, tmp_path / "scanner")
    try:
        args = ("image", "--download-db-only", "--timeout", "80s",
                "--db-repository", f"{PORTED}/{DB_REPO}:2")
        cache = t.fresh_cache()
        res = t.run(*args, cache=cache)
        assert res.returncode == 0, diag(world, gw, res)
        meta = json.loads((cache / "db" / "metadata.json").read_text())
        assert meta["Version"] == 2 and (cache / "db" / "trivy.db").stat().st_size > 0
        world.wait_idle(10)
        assert {e.host for e in world.requests()} == {PORTED}, diag(world, gw)
        blobs = blob_requests(world)
        assert [(b.host, b.status) for b in blobs] == [(PORTED, 200)], diag(world, gw)
        assert world.requests(host=MIRROR) == []
        # one ping (Trivy's; the gateway reuses its challenge), one token, manifest, blob
        assert len(world.requests(host=PORTED, path_regex=r"^/v2/?$")) == 1, diag(world, gw)
        assert len(world.requests(host=PORTED)) == 4, diag(world, gw)

        world.clear_log()
        res = t.run(*args)
        assert res.returncode == 0, diag(world, gw, res)
        world.wait_idle(10)
        assert world.requests() == [], "warm pull reached the upstream" + diag(world, gw)
    finally:
        t.close()
