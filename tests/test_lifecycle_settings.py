"""``lifecycle.prefetch`` settings: the defaults the issue names, per-artifact opt-out by merging
one key, and clear errors naming the key for bad values."""
from __future__ import annotations

import pytest
import yaml

from gateway.settings import ConfigError, PrefetchSource, load_settings


def load(tmp_path, data: dict):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_settings(str(path), env={})


def test_defaults_watch_the_trivy_artifacts_on_their_default_registries():
    p = load_settings(env={}).lifecycle.prefetch
    assert p.enabled and p.keep == 2
    refs = {n: a.reference for n, a in p.artifacts.items()}
    assert refs == {
        "vulnerability_db": "mirror.gcr.io/aquasec/trivy-db:2",
        "java_db": "mirror.gcr.io/aquasec/trivy-java-db:1",
        "checks_bundle": "mirror.gcr.io/aquasec/trivy-checks:2",
        "vex_hub": "https://github.com/aquasecurity/vexhub/archive/refs/heads/main.tar.gz",
    }
    assert p.artifacts["vex_hub"].source is PrefetchSource.VEX_HUB
    db = p.artifacts["vulnerability_db"]
    assert (db.host, db.repository, db.tag) == ("mirror.gcr.io", "aquasec/trivy-db", "2")


def test_one_artifact_is_switched_off_without_repeating_the_others(tmp_path):
    p = load(tmp_path, {"lifecycle": {"prefetch": {"artifacts": {"java_db": {"enabled": False}}}}}
             ).lifecycle.prefetch
    assert not p.artifacts["java_db"].enabled
    assert p.artifacts["java_db"].reference == "mirror.gcr.io/aquasec/trivy-java-db:1"
    assert p.artifacts["vulnerability_db"].enabled


@pytest.mark.parametrize("data, key, words", [
    ({"keep": 0}, "lifecycle.prefetch.keep", "at least 1"),
    ({"jitter": 1.5}, "lifecycle.prefetch.jitter", "below 1"),
    ({"artifacts": {"x": {"reference": "ghcr.io/a/b:1", "source": "helm"}}},
     "lifecycle.prefetch.artifacts.x.source", "one of oci, vex_hub"),
    ({"artifacts": {"x": {"reference": "ghcr.io/a/b"}}},
     "lifecycle.prefetch.artifacts.x.reference", "REGISTRY/REPOSITORY:TAG"),
    ({"artifacts": {"x": {"reference": "http://github.com/a.tar.gz", "source": "vex_hub"}}},
     "lifecycle.prefetch.artifacts.x.reference", "https://"),
    ({"artifacts": {"x": {}}}, "lifecycle.prefetch.artifacts.x.reference", "required"),
])
def test_bad_values_name_the_key(tmp_path, data, key, words):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {"lifecycle": {"prefetch": data}})
    assert err.value.path == key and words in err.value.message, str(err.value)
