"""The mirror door over real sockets (no Trivy): refusals before anything is fetched or stored,
one cache shared with the proxy door, single flight, upstream failures turned into the 429/503
Trivy falls through on, TLS with the operator's certificate, and the ``door`` metric label."""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import urllib.request

import pytest

from tests.e2e_support import CDN, CODELOAD, GHCR, MAVEN, MIRROR, blob_requests, diag
from tests.emulated.certs import create_pki
from tests.mirror_support import get, mirror_addr, mirror_config, oci_error_code

DB_MANIFEST = "/v2/aquasec/trivy-db/manifests/2"
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


@pytest.fixture
def world(clean_upstreams):
    return clean_upstreams


@pytest.fixture
def gw(world, make_gateway):
    return make_gateway(world, mirror_config())


def layer_digest(world, kind: str = "db") -> str:
    return world.published[kind].layer.digest


BAD = [
    ("GET", "/v2/Aquasec/trivy-db/manifests/2", 400, "NAME_INVALID"),
    ("GET", "/v2/aquasec/trivy-db/blobs/sha256:abc", 400, "DIGEST_INVALID"),
    ("GET", "/v2/aquasec/trivy-db/blobs/sha512:" + "ab" * 64, 400, "DIGEST_INVALID"),
    ("GET", "/v2/aquasec/trivy-db/blobs/latest", 400, "DIGEST_INVALID"),
    ("GET", "/v2/aquasec/trivy-db/manifests/-2", 400, "MANIFEST_INVALID"),
    ("GET", "/v2/aquasec/trivy-db/../../etc/passwd/manifests/2", 400, "NAME_INVALID"),
    ("GET", "/v2/aquasec/%2e%2e/trivy-db/manifests/2", 400, "NAME_INVALID"),
    ("GET", "/v2/" + "a/" * 1100 + "manifests/2", 414, "NAME_INVALID"),
    ("GET", "/v2/aquasec/trivy-db/tags/list", 404, "UNSUPPORTED"),
    ("DELETE", DB_MANIFEST, 405, "UNSUPPORTED"),
    ("PUT", "/v2/aquasec/trivy-db/manifests/3", 405, "UNSUPPORTED"),
    ("GET", "/v2/docker.io/library/alpine/manifests/3", 404, "NAME_UNKNOWN"),
    ("GET", "/v2/someone/else/manifests/1", 404, "NAME_UNKNOWN"),
    ("GET", "/maven2/../etc/passwd", 400, None),
    ("GET", "/maven2/org/%2e%2e/x.pom", 400, None),
    ("GET", "/maven2/org/exa\\mple/x.pom", 400, None),
    ("GET", "/elsewhere/org/x.pom", 404, None),
    ("GET", "/vex/vexhub/../../x", 400, None),
    ("GET", "/vex/other/.well-known/vex-repository.json", 404, None),
    ("GET", "/vex/vexhub/archive/0/0/../../x", 400, None),
    ("GET", "/vex/vexhub/archive/x/0/a.tar.gz", 404, None),
]


def test_bad_input_is_refused_before_anything_is_fetched_or_stored(world, gw):
    for method, path, status, code in BAD:
        got, headers, body = get(gw, path, method)
        assert got == status, (method, path, got, body)
        if code:
            assert oci_error_code(body) == code, (path, body)
            assert headers["content-type"] == "application/json"
    # the refusal names the setting to change
    _, _, body = get(gw, "/v2/docker.io/library/alpine/manifests/3")
    assert "cache.oci.public_repositories" in body.decode()
    _, _, body = get(gw, "/v2/someone/else/manifests/1")
    assert "mirror.oci.short_names" in body.decode()
    world.wait_idle(5)
    assert world.requests() == [], diag(world, gw)
    assert gw.status()["cache"]["entries"] == 0


def raw_exchange(gw, data: bytes) -> bytes:
    host, port = mirror_addr(gw).rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_oversized_head_and_request_bodies_are_refused(world, gw):
    big = b"GET " + DB_MANIFEST.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70000 + b"\r\n\r\n"
    assert raw_exchange(gw, big).startswith(b"HTTP/1.1 431 ")
    body = (b"GET " + DB_MANIFEST.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert raw_exchange(gw, body).startswith(b"HTTP/1.1 400 ")
    world.wait_idle(5)
    assert world.requests() == [] and gw.status()["cache"]["entries"] == 0


def test_ping_manifest_head_blob_range_and_door_label(world, gw):
    status, headers, body = get(gw, "/v2/")
    assert status == 200 and json.loads(body) == {}
    assert headers["docker-distribution-api-version"] == "registry/2.0"
    status, headers, body = get(gw, DB_MANIFEST, "HEAD", ACCEPT)
    assert status == 200 and headers["docker-content-digest"].startswith("sha256:")
    assert "www-authenticate" not in headers
    # a scanner's own credentials never reach the cache key or the upstream (anonymous door)
    status, headers, body = get(gw, DB_MANIFEST, headers={**ACCEPT, "Authorization": "Bearer x"})
    assert status == 200 and headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
    assert "hit" in headers["cache-status"] or "collapsed" in headers["cache-status"]
    digest = layer_digest(world)
    status, headers, body = get(gw, f"/v2/mirror.gcr.io/aquasec/trivy-db/blobs/{digest}")
    assert status == 200 and headers["docker-content-digest"] == digest
    size = len(body)
    status, headers, part = get(gw, f"/v2/aquasec/trivy-db/blobs/{digest}",
                                headers={"Range": "bytes=10-19"})
    assert status == 206 and part == body[10:20] and headers["content-range"] == f"bytes 10-19/{size}"
    status, headers, _ = get(gw, f"/v2/aquasec/trivy-db/blobs/{digest}",
                             headers={"Range": f"bytes={size + 5}-"})
    assert status == 416
    status, _, whole = get(gw, f"/v2/aquasec/trivy-db/blobs/{digest}",
                           headers={"Range": "bytes=zz"})
    assert status == 200 and whole == body            # a malformed Range is ignored (RFC 9110)
    world.wait_idle(5)
    assert len(blob_requests(world)) == 1, diag(world, gw)
    manifests = world.requests(host=MIRROR, path_contains="/manifests/")
    assert len(manifests) == 1 and all(e.request_headers.get("authorization") != "Bearer x"
                                       for e in world.requests()), diag(world, gw)
    assert gw.metric("trivy_gateway_requests_total", door="mirror", host=MIRROR) >= 6
    assert gw.metric("trivy_gateway_requests_total", door="proxy") == 0


def test_head_of_an_uncached_blob_behind_a_cdn_redirect(world, gw):
    digest = layer_digest(world)
    status, headers, body = get(gw, f"/v2/ghcr.io/aquasecurity/trivy-db/blobs/{digest}", "HEAD")
    assert status == 200 and body == b"" and "location" not in headers
    assert int(headers["content-length"]) == world.published["db"].layer.size
    status, _, body = get(gw, f"/v2/ghcr.io/aquasecurity/trivy-db/blobs/{digest}")
    assert status == 200 and len(body) == world.published["db"].layer.size
    world.wait_idle(5)
    assert len(world.requests(host=CDN)) == 1, diag(world, gw)


def test_eight_concurrent_cold_clients_one_upstream_blob_get(world, gw):
    digest = layer_digest(world)
    results: list = []

    def pull() -> None:
        status, headers, body = get(gw, f"/v2/aquasec/trivy-db/blobs/{digest}")
        results.append((status, len(body)))

    threads = [threading.Thread(target=pull) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    size = world.published["db"].layer.size
    assert results == [(200, size)] * 8
    world.wait_idle(5)
    assert len(blob_requests(world)) == 1, diag(world, gw)


def proxy_get(gw, url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"https": gw.proxy_url}),
                                         urllib.request.HTTPSHandler(context=gw.client_ssl()))
    with opener.open(url, timeout=60) as r:
        return r.read()


def test_proxy_door_and_mirror_door_share_one_cache(world, gw):
    # proxy door first (the blob as ghcr.io serves it: 307 to the CDN), then the mirror door
    db = layer_digest(world)
    body = proxy_get(gw, f"https://ghcr.io/v2/aquasecurity/trivy-db/blobs/{db}")
    world.wait_idle(5)
    assert len(world.requests(host=CDN)) == 1
    world.clear_log()
    status, headers, again = get(gw, f"/v2/mirror.gcr.io/aquasec/trivy-db/blobs/{db}")
    assert status == 200 and again == body and "hit" in headers["cache-status"]
    # and back: the mirror door first, then the proxy door
    java = layer_digest(world, "javadb")
    status, _, body = get(gw, f"/v2/aquasec/trivy-java-db/blobs/{java}")
    assert status == 200
    assert proxy_get(gw, f"https://mirror.gcr.io/v2/aquasec/trivy-java-db/blobs/{java}") == body
    pom = "/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom"
    assert get(gw, pom)[0] == 200
    assert proxy_get(gw, f"https://repo.maven.apache.org{pom}") == get(gw, pom)[2]
    world.wait_idle(5)
    assert len(blob_requests(world)) == 1 and len(world.requests(host=MAVEN)) == 1, diag(world, gw)


def test_upstream_throttling_and_errors_reach_trivy_as_429_and_503(world, gw):
    for host in (MIRROR, GHCR):
        world.too_many_requests(host, "/manifests/", times=None, retry_after=1)
    status, headers, body = get(gw, DB_MANIFEST, headers=ACCEPT)
    assert status == 429 and oci_error_code(body) == "TOOMANYREQUESTS", body
    assert "retry-after" in headers
    world.clear_faults()
    for host in (MIRROR, GHCR):
        world.fail_status(host, 500, "/manifests/", times=None)
    status, _, body = get(gw, "/v2/aquasec/trivy-java-db/manifests/1", headers=ACCEPT)
    assert status == 503 and oci_error_code(body) == "UNAVAILABLE", body
    world.fail_status(MAVEN, 502, times=None)
    status, _, body = get(gw, "/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom")
    assert status == 503, body
    world.clear_faults()
    world.fail_status(MAVEN, 302, "/demo-transitive/", times=None,
                      headers={"Location": "https://elsewhere.example/x.pom"})
    pom = "/maven2/org/example/demo/demo-transitive/0.9.0/demo-transitive-0.9.0.pom"
    status, headers, body = get(gw, pom)
    assert status == 503 and "location" not in headers, (status, headers, body)
    assert gw.status()["cache"]["entries"] == 0


def test_tls_with_the_operators_certificate(world, make_gateway, tmp_path):
    corp = create_pki(tmp_path / "corp-pki", ("gateway.corp.test",))   # the organisation's PKI
    gw = make_gateway(world, mirror_config({"mirror": {"tls": {
        "cert": str(corp.server_cert_pem), "key": str(corp.server_key_pem)}}}))
    host, port = mirror_addr(gw).rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(corp.ca_pem))   # not the gateway CA
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    try:
        conn.request("GET", "/vex/vexhub/.well-known/vex-repository.json")
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        assert resp.status == 200
        url = doc["versions"][0]["locations"][0]["url"]
        assert url.startswith(f"https://{host}:{port}/vex/vexhub/archive/0/0/") and url.endswith("//vexhub-main")
        digest = layer_digest(world)
        conn.request("GET", f"/v2/aquasec/trivy-db/blobs/{digest}")
        resp = conn.getresponse()
        assert resp.status == 200 and len(resp.read()) == world.published["db"].layer.size
    finally:
        conn.close()


def test_status_api_and_page_show_both_doors(world, gw):
    doors = gw.status()["doors"]
    assert doors["mirror"]["listen"] == mirror_addr(gw) and doors["mirror"]["tls"] is False
    assert doors["proxy"]["listen"] == gw.config["server"]["listen"]
    with urllib.request.urlopen(gw.admin_url + "/", timeout=10) as r:
        page = r.read().decode()
    assert f"http://{mirror_addr(gw)}" in page and 'id="door-mirror"' in page


def test_vex_repository_manifest_and_archive_etag_304(world, gw):
    well_known = "/vex/vexhub/.well-known/vex-repository.json"
    status, headers, _ = get(gw, well_known, "HEAD")
    assert status == 200 and int(headers["content-length"]) > 0
    status, headers, body = get(gw, well_known)
    doc = json.loads(body)
    assert status == 200 and doc["versions"][0]["update_interval"] == "24h"
    url = doc["versions"][0]["locations"][0]["url"]
    assert url == f"http://{mirror_addr(gw)}/vex/vexhub/archive/0/0/main.tar.gz//vexhub-main"
    assert get(gw, well_known, headers={"If-None-Match": headers["etag"]})[0] == 304
    archive = url.split(mirror_addr(gw), 1)[1].split("//", 1)[0]
    status, headers, body = get(gw, archive)
    assert status == 200 and body[:2] == b"\x1f\x8b" and headers["etag"]
    status, _, body = get(gw, archive, headers={"If-None-Match": headers["etag"]})
    assert status == 304 and body == b""
    world.wait_idle(5)
    assert [e.status for e in world.requests(host=CODELOAD)] == [200], diag(world, gw)
    # an archive index the manifest does not list
    assert get(gw, "/vex/vexhub/archive/0/7/main.tar.gz")[0] == 404
