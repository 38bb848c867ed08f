"""A plain-HTTP upstream "registry" for the benchmark's plain-HTTP path (the emulated world is
TLS-only). Serves files under OCI-looking blob paths: ``/v2/<repo>/blobs/sha256:<hex>``.

Usage: ``python bench/plain_upstream.py REPO FILE [FILE ...]`` (each file's sha256 is computed
once) → prints ``PORT <n>`` when listening; runs until SIGTERM/SIGINT. Each request is appended
to stderr as one line (``GET <path>``), the benchmark's upstream access log for this host.
"""
from __future__ import annotations

import asyncio
import hashlib
import sys

from aiohttp import web

from serve_util import serve_until_signal


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


async def main(repo: str, files: list[str]) -> None:
    blobs = {sha256_file(p): p for p in files}

    async def blob(request: web.Request) -> web.StreamResponse:
        print(f"{request.method} {request.path}", file=sys.stderr, flush=True)
        path = blobs.get(request.match_info["digest"])
        if request.match_info["repo"] != repo or path is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        return web.FileResponse(path, headers={
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": request.match_info["digest"]})

    app = web.Application()
    app.router.add_get("/v2/{repo:.+}/blobs/{digest}", blob)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await serve_until_signal(runner, site, (f"BLOB {d}" for d in blobs))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
