"""The Helm chart (deploy/helm/trivy-gateway), rendered by tests/helm_render.py (``helm`` is not
installable here): both modes produce the objects a cluster needs, and the gateway.yaml in the
ConfigMap is a configuration the gateway itself accepts."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from gateway.settings import load_settings
from tests.helm_render import Chart, TemplateError

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "trivy-gateway"


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def shared_values() -> dict:
    v = values()
    v["replicaCount"] = 3
    v["shared"]["enabled"] = True
    v["shared"]["redis"]["existingSecret"] = "redis-auth"
    v["shared"]["s3"].update({"endpoint": "http://seaweedfs-s3:8333", "existingSecret": "s3-keys"})
    return v


def objects(v: dict) -> dict[str, dict]:
    out = {}
    for docs in Chart(CHART, v).render_all().values():
        for doc in docs:
            assert doc["metadata"]["name"].startswith("rel-trivy-gateway")
            out[doc["kind"]] = doc
    return out


def gateway_config(objs: dict, tmp_path: Path, env: dict):
    path = tmp_path / "gateway.yaml"
    path.write_text(objs["ConfigMap"]["data"]["gateway.yaml"])
    return load_settings(str(path), env=env)


def container(objs: dict) -> dict:
    return objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "trivy-gateway"
    assert chart["version"] and chart["appVersion"]


def test_single_replica_mode_keeps_the_pvc(tmp_path):
    objs = objects(values())
    assert set(objs) == {"ConfigMap", "Deployment", "Service", "PersistentVolumeClaim"}
    dep = objs["Deployment"]["spec"]
    assert dep["replicas"] == 1 and dep["strategy"]["type"] == "Recreate"
    vols = {v["name"]: v for v in dep["template"]["spec"]["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == \
        objs["PersistentVolumeClaim"]["metadata"]["name"]
    settings = gateway_config(objs, tmp_path, {})
    assert not settings.cache.shared.enabled
    assert str(settings.server.data_dir) == "/data"


def test_replicas_mode_redis_s3_from_existing_secrets_pdb_and_probes(tmp_path):
    objs = objects(shared_values())
    assert {"PodDisruptionBudget", "ConfigMap", "Deployment", "Service"} <= set(objs)
    assert "PersistentVolumeClaim" not in objs
    dep = objs["Deployment"]["spec"]
    assert dep["replicas"] == 3 and dep["strategy"]["type"] == "RollingUpdate"
    assert objs["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    assert objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == \
        dep["selector"]["matchLabels"]
    c = container(objs)
    env = {e["name"]: e for e in c["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth",
                                                                  "key": "redis-password"}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "s3-keys"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    settings = gateway_config(objs, tmp_path, {"REDIS_PASSWORD": "pw"})
    shared = settings.cache.shared
    assert shared.enabled and shared.redis_password == "pw"
    assert settings.server.worker_count == 1
    assert shared.s3.endpoint == "http://seaweedfs-s3:8333"
    assert int(shared.peer_listen.rsplit(":", 1)[1]) == ports["peer"]
    assert settings.server.admin_addr[1] == ports["admin"]
    vols = {v["name"]: v for v in dep["template"]["spec"]["volumes"]}
    assert "emptyDir" in vols["data"]


def test_workers_per_pod(tmp_path):
    v = shared_values()
    v["shared"]["workers"] = "auto"
    settings = gateway_config(objects(v), tmp_path, {"REDIS_PASSWORD": "pw"})
    assert settings.server.workers == "auto"


def test_autoscaling_replaces_the_fixed_replica_count():
    v = shared_values()
    v["autoscaling"]["enabled"] = True
    objs = objects(v)
    assert "replicas" not in objs["Deployment"]["spec"]
    hpa = objs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == objs["Deployment"]["metadata"]["name"]
    assert hpa["minReplicas"] == 2


def test_a_value_missing_from_values_yaml_is_an_error():
    v = copy.deepcopy(values())
    del v["ports"]["peer"]
    v["shared"]["enabled"] = True
    with pytest.raises(TemplateError, match="ports.peer"):
        objects(v)


# -- the Compose example: 2 replicas + Redis + SeaweedFS (deploy/scale-out) -------------------
SCALE = CHART.parent.parent / "scale-out"


def test_compose_two_replicas_redis_seaweedfs(tmp_path):
    compose = yaml.safe_load((SCALE / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"gateway-a", "gateway-b", "redis", "seaweedfs", "gateway-ca"} <= set(services)
    s3_ids = json_load(SCALE / "s3.json")["identities"][0]["credentials"][0]
    published = set()
    for name in ("gateway-a", "gateway-b"):
        svc = services[name]
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["depends_on"]["gateway-ca"]["condition"] == "service_completed_successfully"
        env = svc["environment"]
        # the defaults of the compose file match the identity SeaweedFS is started with
        assert env["AWS_ACCESS_KEY_ID"].endswith(f":-{s3_ids['accessKey']}}}")
        assert env["AWS_SECRET_ACCESS_KEY"].endswith(f":-{s3_ids['secretKey']}}}")
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
        config = SCALE / mounts["/etc/trivy-gateway/gateway.yaml"]
        assert config.is_file()
        settings = load_settings(str(config), env={"REDIS_PASSWORD": "pw"})
        shared = settings.cache.shared
        assert shared.redis_url == "redis://redis:6379/0" and shared.redis_password == "pw"
        assert shared.s3.endpoint == "http://seaweedfs:8333"
        # the other replica reaches this one by its service name, on the peer port
        assert shared.peer_advertise == f"{name}:{shared.peer_listen.rsplit(':', 1)[1]}"
        assert settings.tls.ca_cert.startswith("/ca/") and "gateway-ca" in mounts.values()
        published |= {p.split(":")[0] for p in svc["ports"]}
    assert len(published) == 4  # no host port used twice
    weed = services["seaweedfs"]
    assert weed["entrypoint"] == ["weed"] and weed["command"][0] == "mini"
    assert "-s3.config=/etc/seaweedfs/s3.json" in weed["command"]


def json_load(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_the_image_carries_the_scale_extra_by_default():
    """The chart and the Compose example run the image in shared mode: its default build must
    include the `scale` extra (redis, aiobotocore)."""
    import re

    dockerfile = (CHART.parent.parent.parent / "Dockerfile").read_text()
    default = re.search(r"^ARG EXTRAS=(\S*)$", dockerfile, re.M)
    assert default and "scale" in default.group(1).split(",")
    assert re.search(r'pip wheel --wheel-dir /wheels "\.\$\{EXTRAS:\+\[\$EXTRAS\]\}"', dockerfile)
