"""Resource semantics as tables: the cache key, TTL and flags each Trivy request gets."""
import pytest

from gateway.resources import IMMUTABLE, classify, response_ttl
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
