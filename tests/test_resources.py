"""Resource semantics as tables: the cache key, TTL and flags each Trivy request gets."""
import pytest

from gateway.resources import (IMMUTABLE, classify, fold_fields, github_ttl, response_ttl,
                               selected_fields, variant_matches, vary_names)
from gateway.settings import load_settings

CFG = load_settings(env={}).cache
D = "sha256:" + "ab" * 32


def c(method, host, target, headers=None, scheme="https"):
    path, _, query = target.partition("?")
    return classify(method, host, path, query, {k.lower(): v for k, v in (headers or {}).items()}, CFG,
                    scheme=scheme)


def test_blob_keyed_by_digest_and_shared_across_public_registries():
    a = c("GET", "mirror.gcr.io", f"/v2/aquasec/trivy-db/blobs/{D}")
    b = c("GET", "ghcr.io", f"/v2/aquasecurity/trivy-db/blobs/{D}", {"Authorization": "Bearer x"})
    assert a.kind == b.kind == "oci_blob" and a.cache_key == b.cache_key
    assert a.ttl == IMMUTABLE and a.digest == D and a.follow_redirects
    assert a.artifact == "vulnerability_db"


def test_private_repository_blob_key_depends_on_credentials():
    a = c("GET", "ghcr.io", f"/v2/acme/private/blobs/{D}", {"Authorization": "Bearer one"})
    b = c("GET", "ghcr.io", f"/v2/acme/private/blobs/{D}", {"Authorization": "Bearer two"})
    anon = c("GET", "ghcr.io", f"/v2/acme/private/blobs/{D}")
    assert len({a.cache_key, b.cache_key, anon.cache_key}) == 3 and not a.public


def test_tag_manifest_ttl_from_cadence_and_accept_in_key():
    db = c("GET", "mirror.gcr.io", "/v2/aquasec/trivy-db/manifests/2", {"Accept": "a, b"})
    java = c("GET", "mirror.gcr.io", "/v2/aquasec/trivy-java-db/manifests/1", {"Accept": "a"})
    other_accept = c("GET", "mirror.gcr.io", "/v2/aquasec/trivy-db/manifests/2",
                     {"Accept": "application/vnd.oci.image.index.v1+json"})
    assert db.ttl == 6 * 3600 and java.ttl == 24 * 3600
    assert db.cache_key != other_accept.cache_key
    assert c("GET", "mirror.gcr.io", "/v2/aquasec/trivy-db/manifests/2", {"Accept": "b,a"}).cache_key == db.cache_key
    by_digest = c("GET", "mirror.gcr.io", f"/v2/aquasec/trivy-db/manifests/{D}")
    assert by_digest.ttl == IMMUTABLE and by_digest.digest == D


def test_auth_dance_cached_only_without_credentials():
    assert c("GET", "ghcr.io", "/v2/").cache_key
    assert c("GET", "ghcr.io", "/token?scope=repository:aquasecurity/trivy-db:pull&service=ghcr.io").cache_key
    assert c("GET", "ghcr.io", "/token?scope=repository:x:pull", {"Authorization": "Basic x"}).cache_key is None


@pytest.mark.parametrize("path, ttl", [
    ("/maven2/org/x/lib/1.0/lib-1.0.pom", IMMUTABLE),
    ("/maven2/org/x/lib/maven-metadata.xml", 600),
    ("/maven2/org/x/lib/1.0-SNAPSHOT/lib-1.0-20240101.120000-1.pom", 600),
])
def test_maven_ttls(path, ttl):
    r = c("GET", "repo.maven.apache.org", path)
    assert r.kind == "maven" and r.ttl == ttl and r.negative_ttl == 3600
    assert 429 not in r.cacheable_statuses and 503 not in r.cacheable_statuses


def test_github_key_varies_by_api_headers_and_marks_vex_archive():
    a = c("GET", "api.github.com", "/repos/aquasecurity/vexhub/contents/",
          {"Accept": "application/vnd.github.v3+json"})
    b = c("GET", "api.github.com", "/repos/aquasecurity/vexhub/contents/", {"Accept": "text/html"})
    assert a.cache_key != b.cache_key
    arch = c("GET", "codeload.github.com", "/aquasecurity/vexhub/tar.gz/refs/heads/main")
    assert arch.artifact == "vex_hub"
    assert 302 in c("GET", "github.com", "/aquasecurity/vexhub/archive/refs/heads/main.tar.gz").cacheable_statuses


def test_github_archives_have_their_own_ttl():
    """VEX repository archives follow cache.github.archive_ttl, API answers and raw files
    cache.github.ttl: an operator can keep the archive fresh and the API quota spared."""
    cfg = load_settings(env={}, overrides={"cache": {"github": {"ttl": "24h",
                                                                "archive_ttl": "10m"}}}).cache
    def ttl(host, path):
        return classify("GET", host, path, "", {}, cfg, scheme="https").ttl
    assert ttl("codeload.github.com", "/aquasecurity/vexhub/tar.gz/refs/heads/main") == 600
    assert ttl("github.com", "/aquasecurity/vexhub/archive/refs/heads/main.tar.gz") == 600
    assert ttl("github.com", "/acme/vex/archive/v1.zip") == 600
    assert ttl("api.github.com", "/repos/aquasecurity/vexhub/contents/") == 86400
    assert ttl("raw.githubusercontent.com", "/aquasecurity/vexhub/main/vex-repository.json") == 86400
    assert ttl("github.com", "/aquasecurity/vexhub/vex-repository.json") == 86400
    assert ttl("github.com", "/archive/x/y") == 86400      # not /<owner>/<repo>/archive/
    assert CFG.github.archive_ttl == CFG.github.ttl == 3600  # the shipped defaults


def test_generic_rfc9111_lifetimes():
    assert c("POST", "example.org", "/x").cache_key is None
    assert response_ttl(200, {"cache-control": "max-age=60"}, False) == 60
    assert response_ttl(200, {"cache-control": "s-maxage=5, max-age=60"}, False) == 5
    assert response_ttl(200, {"cache-control": "private, max-age=60"}, False) is None
    assert response_ttl(200, {"cache-control": "no-store"}, False) is None
    assert response_ttl(200, {"cache-control": "max-age=60"}, True) is None
    assert response_ttl(200, {"cache-control": "public, max-age=60"}, True) == 60
    assert response_ttl(200, {}, False) is None
    assert response_ttl(200, {"cache-control": "max-age=60", "set-cookie": "a=b"}, False) is None


# -- D3: the scheme the gateway fetches with is part of every key -------------------------------
@pytest.mark.parametrize("host, target", [
    ("ghcr.io", "/v2/aquasecurity/trivy-db/manifests/2"),
    ("ghcr.io", f"/v2/aquasecurity/trivy-db/manifests/{D}"),
    ("ghcr.io", f"/v2/aquasecurity/trivy-db/blobs/{D}"),
    ("ghcr.io", "/v2/"),
    ("ghcr.io", "/token?scope=repository:aquasecurity/trivy-db:pull&service=ghcr.io"),
    ("repo.maven.apache.org", "/maven2/org/x/lib/1.0/lib-1.0.pom"),
    ("api.github.com", "/repos/aquasecurity/vexhub/contents/"),
    ("example.org", "/x?y=1"),
])
def test_plain_http_and_https_never_share_a_key(host, target):
    https = c("GET", host, target, scheme="https")
    http = c("GET", host, target, scheme="http")
    assert https.cache_key and http.cache_key and https.cache_key != http.cache_key


# -- D10: what is forwarded is keyed ------------------------------------------------------------
def test_tag_and_ping_keys_hold_the_forwarded_query():
    tag = "/v2/aquasecurity/trivy-db/manifests/qX"
    assert c("GET", "ghcr.io", tag + "?ns=evil").cache_key != c("GET", "ghcr.io", tag).cache_key
    assert c("GET", "ghcr.io", "/v2/?x=1").cache_key != c("GET", "ghcr.io", "/v2/").cache_key
    # content-addressed: verified against the digest, whatever the query
    blob = f"/v2/aquasecurity/trivy-db/blobs/{D}"
    assert c("GET", "ghcr.io", blob + "?ns=x").cache_key == c("GET", "ghcr.io", blob).cache_key


# -- D5: RFC 9111 with repeated fields, Vary, for generic and GitHub hosts --------------------
@pytest.mark.parametrize("lines, ttl", [
    ([("Cache-Control", "no-store"), ("Cache-Control", "max-age=600")], None),
    ([("Cache-Control", "max-age=600"), ("Cache-Control", "private")], None),
    ([("Cache-Control", "max-age=600"), ("Vary", "Accept"), ("Vary", "*")], None),
    ([("Cache-Control", "max-age=600"), ("Set-Cookie", "a=b")], None),
    ([("Cache-Control", "max-age=600"), ("Vary", "Cookie")], 600),
    ([("cache-control", "public"), ("Cache-Control", "max-age=60")], 60),
])
def test_generic_lifetime_reads_every_field_line(lines, ttl):
    assert response_ttl(200, fold_fields(lines), False) == ttl


@pytest.mark.parametrize("lines, ttl", [
    ([("Cache-Control", "public, max-age=60")], 3600),         # the operator's TTL
    ([("Cache-Control", "private, max-age=60")], None),
    ([("Cache-Control", "max-age=60"), ("Cache-Control", "no-store")], None),
    ([("Set-Cookie", "logged_in=no")], None),
    ([("Vary", "*")], None),
    ([("Cache-Control", "no-cache")], 0.0),                    # stored, revalidated on each use
    ([("Vary", "Accept, Accept-Encoding")], 3600),
])
def test_github_hosts_follow_rfc9111_with_the_configured_ttl(lines, ttl):
    assert github_ttl(fold_fields(lines), 3600.0) == ttl


@pytest.mark.parametrize("stored_request, later, reusable", [
    ({"cookie": "alice=1"}, {"cookie": "alice=1"}, True),
    ({"cookie": "alice=1"}, {}, False),
    ({}, {"cookie": "alice=1"}, False),
    ({"accept": "a, b"}, {"accept": "a,b"}, True),             # whitespace is insignificant
    ({"accept": "a, b"}, {"accept": "b, a"}, False),
])
def test_vary_selects_the_variant(stored_request, later, reusable):
    names = vary_names(fold_fields([("Vary", "Cookie"), ("Vary", "Accept")]))
    assert names == ("accept", "cookie")
    stored = selected_fields(names, stored_request)
    assert variant_matches(stored, later) is reusable
