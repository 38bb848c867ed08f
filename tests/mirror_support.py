"""Helpers for the mirror-door tests: a gateway with ``server.mirror_listen`` and a Trivy that
knows nothing of the gateway's CA (no ``SSL_CERT_FILE``, no proxy it could reach: any request
that bypassed the mirror would fail instead of silently succeeding)."""
from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from typing import Optional

from tests.e2e_support import _DROP_ENV, TrivyClient
from tests.gateway_harness import deep_merge, free_port

#: a proxy address nothing listens on (the discard port): bypassing the mirror fails loudly
DEAD_PROXY = "http://127.0.0.1:9"


def mirror_config(extra: Optional[dict] = None) -> dict:
    return deep_merge({"server": {"mirror_listen": f"127.0.0.1:{free_port()}"}}, extra or {})


def mirror_addr(gw) -> str:
    """``127.0.0.1:port`` of the gateway's mirror door."""
    return gw.config["server"]["mirror_listen"]


class MirrorTrivy(TrivyClient):
    """A scanner configured with the gateway as its mirror: no CA, no proxy."""

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TRIVY_") and k not in _DROP_ENV}
        env.update(HOME=str(self.home), TMPDIR=str(self.home / "tmp"), TRIVY_NO_PROGRESS="true",
                   HTTPS_PROXY=DEAD_PROXY, HTTP_PROXY=DEAD_PROXY, NO_PROXY="127.0.0.1,localhost")
        return env

    def refresh_bundle(self) -> Path:  # never hand the gateway CA to this scanner
        raise AssertionError("a mirror client must not get the gateway CA")

    def write(self, name: str, text: str) -> Path:
        path = self.home / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


def get(gw, path: str, method: str = "GET", headers: Optional[dict] = None,
        timeout: float = 60) -> tuple[int, dict, bytes]:
    """One request to the mirror door over plain HTTP: (status, headers, body)."""
    host, port = mirror_addr(gw).rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def oci_error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]
