"""The real ``trivy`` binary (Go crypto/tls, Go's proxy handling) through the gateway.

* an intercepted host: Go accepts the minted leaf (SAN, EKU, chain to the gateway CA given in
  SSL_CERT_FILE) and reaches the test handler, whose 503 for ``/v2/`` is what Trivy reports;
* a denied host: Go prints only the status line of a refused CONNECT, so the explanation must be
  in the reason phrase, and it is what the person reading Trivy's error sees.
"""
from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from proxy_support import make_settings, running_gateway

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("trivy") is None, reason="trivy binary not installed")]


async def run_trivy(gw, tmp_path, repository: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HTTPS_PROXY=gw.url, SSL_CERT_FILE=gw.ca_path, HOME=str(tmp_path),
               TRIVY_NO_PROGRESS="true")
    proc = await asyncio.create_subprocess_exec(
        "trivy", "image", "--download-db-only", "--db-repository", repository,
        "--cache-dir", str(tmp_path / f"cache-{repository.split('/')[0]}"), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(60):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode("utf-8", "replace")


async def test_trivy_accepts_minted_certificate_and_shows_denial_reason(tmp_path):
    rules = [{"host": "registry.test", "action": "intercept"}]
    async with running_gateway(make_settings(tmp_path, rules=rules)) as gw:
        (code_ok, out_ok), (code_denied, out_denied) = await asyncio.gather(
            run_trivy(gw, tmp_path, "registry.test/aquasec/trivy-db:2"),
            run_trivy(gw, tmp_path, "registry.example.test/aquasec/trivy-db:2"))
    # intercepted: TLS with the minted leaf worked, the handler's 503 came back to Trivy
    assert code_ok == 1
    assert "x509" not in out_ok and "certificate" not in out_ok, out_ok
    assert "GET https://registry.test/v2/: unexpected status code 503 Service Unavailable" in out_ok
    assert "registry unavailable (test)" in out_ok
    assert gw.handler.exchanges and all(ex.scheme == "https" and ex.path == "/v2/"
                                        for ex in gw.handler.exchanges)
    assert gw.metric("trivy_gateway_tls_handshake_errors_total") == 0
    # denied: the reason phrase is the whole explanation Trivy prints
    assert code_denied == 1
    assert ('Get "https://registry.example.test/v2/": registry.example.test is not on the '
            'gateway allowlist (policy.rules)') in out_denied, out_denied
