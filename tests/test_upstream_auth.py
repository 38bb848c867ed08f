"""Central credentials and the gateway's own registry tokens."""
from __future__ import annotations

import asyncio
import base64
import json
import os

from aiohttp import web
from structlog.testing import capture_logs

from gateway.settings import CredentialSettings
from upstream_support import GET, pki, upstream  # noqa: F401


async def test_credentials_injected_for_their_host_only_and_never_across_redirects(pki, tmp_path):
    secret_file = tmp_path / "github-token"
    secret_file.write_text("ghp_first\n")

    async def api(request, srv):
        if request.path == "/redirect":
            return web.Response(status=302, headers={"Location": "https://codeload.test/archive"})
        if request.path == "/same-host-redirect":
            return web.Response(status=302, headers={"Location": "/repos/x"})
        return web.Response(text="api")

    async def codeload(request, srv):
        return web.Response(text="tarball")

    cred = CredentialSettings(host="api.test", type="bearer", secret_file=str(secret_file),
                              secret="ghp_first")
    async with upstream(pki, {"api.test": api, "codeload.test": codeload},
                        credentials=(cred,)) as rig:
        client, (api_srv, cl_srv) = rig.client, rig.servers.values()
        with capture_logs() as logs:
            resp = await client.request(GET("https://api.test/repos/x"))
            await resp.read()
            assert api_srv.log[-1].headers["Authorization"] == "Bearer ghp_first"

            resp = await client.request(GET("https://api.test/redirect", follow_redirects=True,
                                            headers={"Cookie": "a=b"}))
            assert await resp.read() == b"tarball"
            assert resp.history == ((302, "https://codeload.test/archive"),)
            assert resp.url == "https://codeload.test/archive"
            assert api_srv.log[-1].headers["Authorization"] == "Bearer ghp_first"
            assert "Authorization" not in cl_srv.log[-1].headers       # not carried over
            assert "Cookie" not in cl_srv.log[-1].headers

            # same-host redirect keeps it
            resp = await client.request(GET("https://api.test/same-host-redirect",
                                            follow_redirects=True))
            await resp.read()
            assert api_srv.log[-1].headers["Authorization"] == "Bearer ghp_first"

            # a request to another host never gets it
            resp = await client.request(GET("https://codeload.test/other"))
            await resp.read()
            assert "Authorization" not in cl_srv.log[-1].headers

            # rotated secret file → new value (checked at most once a second)
            secret_file.write_text("ghp_second\n")
            os.utime(secret_file, ns=(1, 1))
            await asyncio.sleep(1.05)
            resp = await client.request(GET("https://api.test/repos/y"))
            await resp.read()
            assert api_srv.log[-1].headers["Authorization"] == "Bearer ghp_second"
        text = json.dumps(logs, default=str) + repr(client.settings.credentials)
        assert "ghp_first" not in text and "ghp_second" not in text


def _registry(srv_state: dict, realm: str):
    async def registry(request, srv):
        auth = request.headers.get("Authorization", "")
        if request.path == "/v2/":
            return web.Response(status=401, text='{"errors":[]}', headers={
                "WWW-Authenticate": f'Bearer realm="{realm}",service="reg.test",'
                                    f'scope="repository:user/image:pull"'})
        if auth != f"Bearer {srv_state['valid']}":
            return web.Response(status=401, headers={
                "WWW-Authenticate": f'Bearer realm="{realm}",service="reg.test"'})
        return web.Response(text="manifest", headers={"Docker-Content-Digest": "sha256:abc"})
    return registry


async def test_registry_token_flow_cached_and_refreshed_once(pki, tmp_path):
    state = {"valid": "T1", "issued": 0}

    async def auth(request, srv):
        assert request.query["scope"] == "repository:aquasecurity/trivy-db:pull"
        assert request.query["service"] == "reg.test"
        state["issued"] += 1
        token = f"T{state['issued']}"
        return web.json_response({"token": token, "expires_in": 300})

    async with upstream(pki, {"reg.test": _registry(state, "https://auth.test/token"), "auth.test": auth}) as rig:
        client, _ = rig.client, rig.metrics
        reg, auth_srv = rig.servers.values()
        req = dict(headers={"Authorization": "Bearer client-own-token"},
                   registry_auth=("reg.test", "aquasecurity/trivy-db"))
        # concurrent first requests share one token fetch
        resps = await asyncio.gather(*(client.request(GET(
            "https://reg.test/v2/aquasecurity/trivy-db/manifests/2", **req)) for _ in range(5)))
        assert all(r.status == 200 for r in resps)
        for r in resps:
            assert await r.read() == b"manifest"
        assert auth_srv.count == 1
        assert [s.path_qs for s in reg.log].count("/v2/") == 1
        manifests = [s for s in reg.log if "manifests" in s.path_qs]
        assert all(s.headers["Authorization"] == "Bearer T1" for s in manifests)  # client's ignored
        assert "Authorization" not in auth_srv.log[0].headers                     # anonymous

        # registry revokes T1: one 401, one refresh, success
        state["valid"] = "T2"
        resp = await client.request(GET("https://reg.test/v2/aquasecurity/trivy-db/manifests/2",
                                        **req))
        assert resp.status == 200
        await resp.release()
        assert auth_srv.count == 2
        assert reg.log[-1].headers["Authorization"] == "Bearer T2"

        # a token that keeps being refused: refreshed once only, then the 401 is the answer
        state["valid"] = "never"
        before_auth, before_reg = auth_srv.count, reg.count
        resp = await client.request(GET("https://reg.test/v2/aquasecurity/trivy-db/manifests/2",
                                        **req))
        assert resp.status == 401
        await resp.release()
        assert auth_srv.count == before_auth + 1
        assert reg.count - before_reg == 3               # manifest, /v2/ re-ping, manifest


async def test_registry_token_with_basic_credentials_and_token_endpoint_429(pki):
    state = {"valid": "T1"}

    async def auth(request, srv):
        if srv.state.get("throttle"):
            return web.Response(status=429, text="TOOMANYREQUESTS", headers={"Retry-After": "1"})
        expect = "Basic " + base64.b64encode(b"robot:pw").decode()
        assert request.headers.get("Authorization") == expect
        return web.json_response({"access_token": "T1", "expires_in": 60})

    registry = _registry(state, "https://reg.test/token")

    async def both(request, srv):      # token endpoint on the registry host (like ghcr.io/token)
        if request.path == "/token":
            return await auth(request, srv)
        return await registry(request, srv)
    cred = CredentialSettings(host="reg.test", type="basic", username="robot", secret_env="X",
                              secret="pw")
    async with upstream(pki, {"reg.test": both}, credentials=(cred,),
                        retry=dict(attempts=2)) as (client, _, reg):
        resp = await client.request(GET("https://reg.test/v2/aquasecurity/trivy-db/manifests/2",
                                        registry_auth=("reg.test", "aquasecurity/trivy-db")))
        assert resp.status == 200
        await resp.release()
        ping = next(s for s in reg.log if s.path_qs == "/v2/")
        assert "Authorization" not in ping.headers       # ping goes anonymous
        # a repository whose token request is throttled: the 429 is handed back as the answer
        reg.state["throttle"] = True
        resp = await client.request(GET("https://reg.test/v2/aquasecurity/trivy-java-db/manifests/1",
                                        registry_auth=("reg.test", "aquasecurity/trivy-java-db")))
        assert resp.status == 429
        assert await resp.read() == b"TOOMANYREQUESTS"
