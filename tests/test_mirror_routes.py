"""The mirror door's routing table (pure) and its settings' validation."""
from __future__ import annotations

import pytest

from gateway.mirror.routes import RouteError, RouteKind, route, split_location
from gateway.settings import load_settings

S = load_settings(env={})
DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("target,host,upstream", [
    ("/v2/mirror.gcr.io/aquasec/trivy-db/manifests/2", "mirror.gcr.io",
     "/v2/aquasec/trivy-db/manifests/2"),
    ("/v2/ghcr.io/aquasecurity/trivy-checks/manifests/" + DIGEST, "ghcr.io",
     "/v2/aquasecurity/trivy-checks/manifests/" + DIGEST),
    ("/v2/aquasec/trivy-java-db/blobs/" + DIGEST, "mirror.gcr.io",
     "/v2/aquasec/trivy-java-db/blobs/" + DIGEST),
    ("/v2/aquasecurity/trivy-db/manifests/2", "ghcr.io", "/v2/aquasecurity/trivy-db/manifests/2"),
    ("/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom", "repo.maven.apache.org",
     "/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom"),
])
def test_routes_to_the_url_the_proxy_door_would_see(target, host, upstream):
    rt = route("GET", target, S)
    assert (rt.host, rt.target) == (host, upstream)


def test_ping_and_vex_routes():
    assert route("GET", "/v2/", S).kind is RouteKind.OCI_PING
    assert route("HEAD", "/v2", S).kind is RouteKind.OCI_PING
    rt = route("HEAD", "/vex/vexhub/.well-known/vex-repository.json", S)
    assert rt.kind is RouteKind.VEX_MANIFEST and rt.vex_name == "vexhub"
    rt = route("GET", "/vex/vexhub/archive/0/2/main.tar.gz", S)
    assert rt.kind is RouteKind.VEX_ARCHIVE and rt.vex_location == (0, 2)


@pytest.mark.parametrize("target,status", [
    ("/v2/aquasec/trivy-db/manifests/" + "x" * 200, 400),
    ("/v2/aquasec/trivy-db/blobs/" + DIGEST.upper(), 400),
    ("/v2/aquasec//trivy-db/manifests/2", 400),
    ("/v2/mirror.gcr.io/aquasec/other/manifests/2", 404),
    ("/maven2/", 400),
    ("/maven2//org/x.pom", 400),
])
def test_refusals(target, status):
    with pytest.raises(RouteError) as exc:
        route("GET", target, S)
    assert exc.value.status == status


def test_a_query_is_never_forwarded():
    rt = route("GET", "/maven2/org/x.pom?x=1/../..", S)
    assert rt.target == "/maven2/org/x.pom"


def test_go_getter_subdir_suffix():
    url = "https://github.com/aquasecurity/vexhub/archive/refs/heads/main.tar.gz//vexhub-main"
    assert split_location(url) == (url[:-len("//vexhub-main")], "//vexhub-main")
    assert split_location("https://h/a.tar.gz") == ("https://h/a.tar.gz", "")


def test_mirror_is_off_by_default():
    assert S.server.mirror_addr is None


def test_mirror_listen_from_env_and_flag():
    from gateway.cli import _overrides, build_parser

    env = load_settings(env={"TRIVY_GATEWAY_MIRROR_LISTEN": "127.0.0.1:5000"})
    assert env.server.mirror_addr == ("127.0.0.1", 5000)
    args = build_parser().parse_args(["serve", "--mirror-listen", "0.0.0.0:5001"])
    assert load_settings(env={}, overrides=_overrides(args)).server.mirror_addr == ("0.0.0.0", 5001)


def test_path_prefix_registry_on_a_non_default_port():
    """``registry.mirrors`` for ``registry.corp:5000`` produces ``/v2/registry.corp:5000/<repo>/…``:
    the port belongs to the registry, not to the OCI name."""
    oci = S.cache.oci
    s = load_settings(env={}, overrides={"cache": {"oci": {
        "registries": [*oci.registries, "registry.corp:5000"],
        "public_repositories": [*oci.public_repositories, "registry.corp:5000/team/trivy-db"]}}})
    rt = route("GET", "/v2/registry.corp:5000/team/trivy-db/manifests/2", s)
    assert (rt.host, rt.target) == ("registry.corp:5000", "/v2/team/trivy-db/manifests/2")
    for bad in ("/v2/registry.corp:5000/team/other/manifests/2",
                "/v2/registry.corp:99999/team/trivy-db/manifests/2"):
        with pytest.raises(RouteError):
            route("GET", bad, s)
