"""Request handlers of the emulated upstreams.

* :class:`Registry` - mirror.gcr.io and ghcr.io (OCI distribution: ping,
  anonymous token, manifests, blobs; ghcr.io redirects blob GETs to the CDN).
* :class:`BlobCDN` - pkg-containers.githubusercontent.com (signed URLs).
* :class:`GitHub` - api.github.com, raw.githubusercontent.com, github.com,
  codeload.github.com (VEX Hub).
* :class:`Maven` - repo.maven.apache.org.
* :class:`VersionCheck` - check.trivy.dev.
"""

from __future__ import annotations

import base64
import datetime as _dt
import email.utils
import hashlib
import hmac
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from .artifacts import Blob, OciArtifact, rfc3339
from .httpserver import Request, Response, text_response

OCI_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def _json(status: int, obj, headers: list[tuple[str, str]] | None = None,
          content_type: str = "application/json") -> Response:
    return Response(status, [("Content-Type", content_type)] + list(headers or []),
                    json.dumps(obj, separators=(",", ":")).encode())


def oci_error(status: int, code: str, message: str, detail=None,
              headers: list[tuple[str, str]] | None = None) -> Response:
    return _json(status, {"errors": [{"code": code, "message": message, "detail": detail}]}, headers)


def oci_error_body(code: str, message: str, detail=None) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]},
                      separators=(",", ":")).encode()


def parse_range(value: str | None, size: int) -> tuple[int, int] | None | str:
    """Single byte range -> (start, end inclusive); None = no/ignored range;
    "unsatisfiable" when it cannot be served."""
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", value)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multi-range or junk: serve the whole thing
    a, b = m.group(1), m.group(2)
    if a == "":
        n = int(b)
        if n == 0:
            return "unsatisfiable"
        start, end = max(0, size - n), size - 1
    else:
        start = int(a)
        end = int(b) if b else size - 1
        end = min(end, size - 1)
    if start >= size or start > end:
        return "unsatisfiable"
    return start, end


def serve_bytes(req: Request, data, headers: list[tuple[str, str]], ranged: bool = True) -> Response:
    """200/206/416 for a body, honouring a single Range when *ranged*."""
    size = len(data)
    headers = list(headers)
    if ranged:
        headers.append(("Accept-Ranges", "bytes"))
        r = parse_range(req.header("range"), size)
        if r == "unsatisfiable":
            return Response(416, headers + [("Content-Range", f"bytes */{size}")], b"")
        if isinstance(r, tuple):
            start, end = r
            body = data[start:end + 1]
            return Response(206, headers + [("Content-Range", f"bytes {start}-{end}/{size}")], body)
    return Response(200, headers, data)


# ============================================================ OCI registries
@dataclass
class RepoState:
    tags: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, Blob] = field(default_factory=dict)
    history: list[tuple[str, str, float]] = field(default_factory=list)  # (tag, digest, time)


class Registry:
    """An OCI registry with anonymous bearer-token auth.

    mirror.gcr.io: realm https://mirror.gcr.io/v2/token, blobs served directly.
    ghcr.io: realm https://ghcr.io/token, blob GET -> 307 to the CDN.
    """

    TOKEN_TTL = 300

    def __init__(self, host: str, token_path: str, secret: bytes, cdn: "BlobCDN | None" = None,
                 ping_scope: str | None = None) -> None:
        self.host = host
        self.token_path = token_path
        self.realm = f"https://{host}{token_path}"
        self.service = host
        self.cdn = cdn
        self.ping_scope = ping_scope
        self._secret = secret
        self._lock = threading.Lock()
        self.repos: dict[str, RepoState] = {}
        self.token_ttl = self.TOKEN_TTL
        self.require_auth = True

    # -- publishing --------------------------------------------------------------
    def publish(self, repo: str, tag: str, art: OciArtifact) -> str:
        with self._lock:
            st = self.repos.setdefault(repo, RepoState())
            st.manifests[art.manifest_digest] = art.manifest
            st.blobs.update(art.blobs)
            st.tags[tag] = art.manifest_digest
            st.history.append((tag, art.manifest_digest, time.time()))
        if self.cdn is not None:
            for b in art.blobs.values():
                self.cdn.add_blob(b)
        return art.manifest_digest

    def tag_digest(self, repo: str, tag: str) -> str | None:
        with self._lock:
            st = self.repos.get(repo)
            return st.tags.get(tag) if st else None

    def remove_blob(self, repo: str, digest: str) -> None:
        with self._lock:
            st = self.repos.get(repo)
            if st:
                st.blobs.pop(digest, None)

    # -- tokens ------------------------------------------------------------------
    def issue_token(self, repos: list[str], ttl: int | None = None) -> str:
        claims = {"sub": "anonymous", "iss": self.host, "repos": sorted(set(repos)),
                  "exp": int(time.time()) + (ttl if ttl is not None else self.token_ttl),
                  "jti": base64.urlsafe_b64encode(os.urandom(6)).decode()}
        payload = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).decode().rstrip("=")
        sig = hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{payload}.{sig}"

    def check_token(self, token: str) -> dict | None:
        try:
            payload, sig = token.rsplit(".", 1)
        except ValueError:
            return None
        want = hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()[:32]
        if not hmac.compare_digest(want, sig):
            return None
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            return None
        if claims.get("exp", 0) < time.time():
            return None
        return claims

    def _bearer(self, req: Request) -> dict | None:
        auth = req.header("authorization") or ""
        if not auth.lower().startswith("bearer "):
            return None
        return self.check_token(auth[7:].strip())

    def _challenge(self, scope: str | None, error: str | None = None) -> list[tuple[str, str]]:
        v = f'Bearer realm="{self.realm}",service="{self.service}"'
        if scope:
            v += f',scope="{scope}"'
        if error:
            v += f',error="{error}"'
        return [("WWW-Authenticate", v), ("Docker-Distribution-API-Version", "registry/2.0")]

    # -- routing -----------------------------------------------------------------
    _rx = re.compile(r"^/v2/(?P<name>[a-z0-9]+(?:[._/-][a-z0-9]+)*)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")

    async def handle(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return oci_error(405, "UNSUPPORTED", "the operation is unsupported")
        if req.path == self.token_path:
            return self._token(req)
        if req.path in ("/v2/", "/v2"):
            if self._bearer(req) is not None or not self.require_auth:
                return _json(200, {}, [("Docker-Distribution-API-Version", "registry/2.0")])
            return oci_error(401, "UNAUTHORIZED", "authentication required", None,
                             self._challenge(self.ping_scope))
        m = self._rx.match(req.path)
        if not m:
            return oci_error(404, "NOT_FOUND", "not found")
        name, kind, ref = m.group("name"), m.group("kind"), m.group("ref")
        scope = f"repository:{name}:pull"
        if self.require_auth:
            claims = self._bearer(req)
            if claims is None:
                return oci_error(401, "UNAUTHORIZED", "authentication required",
                                 [{"Type": "repository", "Name": name, "Action": "pull"}],
                                 self._challenge(scope))
            if name not in claims.get("repos", []):
                return oci_error(401, "UNAUTHORIZED", "authentication required",
                                 [{"Type": "repository", "Name": name, "Action": "pull"}],
                                 self._challenge(scope, "insufficient_scope"))
        with self._lock:
            st = self.repos.get(name)
            if st is None:
                return oci_error(404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name})
            if kind == "manifests":
                digest = ref if ref.startswith("sha256:") else st.tags.get(ref)
                body = st.manifests.get(digest) if digest else None
                if body is None:
                    return oci_error(404, "MANIFEST_UNKNOWN", "manifest unknown", {"Tag" if ":" not in ref else "Digest": ref})
            else:
                blob = st.blobs.get(ref)
                if blob is None:
                    return oci_error(404, "BLOB_UNKNOWN", "blob unknown to registry", ref)
        if kind == "manifests":
            headers = [
                ("Content-Type", OCI_MANIFEST_TYPE),
                ("Docker-Content-Digest", digest),
                ("ETag", f'"{digest}"'),
                ("Docker-Distribution-API-Version", "registry/2.0"),
            ]
            return Response(200, headers, body)
        return self._blob(req, blob)

    def _blob(self, req: Request, blob: Blob) -> Response:
        base = [
            ("Content-Type", "application/octet-stream"),
            ("Docker-Content-Digest", blob.digest),
            ("ETag", f'"{blob.digest}"'),
            ("Docker-Distribution-API-Version", "registry/2.0"),
            ("Cache-Control", "max-age=31536000"),
        ]
        if self.cdn is not None and req.method == "GET":
            url = self.cdn.signed_url(blob.digest)
            return Response(307, [("Content-Type", "text/html; charset=utf-8"), ("Location", url),
                                  ("Docker-Distribution-API-Version", "registry/2.0")], b"",
                            note="redirect")
        return serve_bytes(req, blob.view(), base, ranged=True)

    def _token(self, req: Request) -> Response:
        if req.param("service") not in (None, self.service):
            return _json(400, {"errors": [{"code": "DENIED", "message": "invalid service"}]})
        repos: list[str] = []
        for scope in req.params.get("scope", []):
            for part in scope.split(" "):
                bits = part.split(":")
                if len(bits) >= 3 and bits[0] == "repository":
                    repos.append(":".join(bits[1:-1]))
        tok = self.issue_token(repos)
        now = _dt.datetime.now(_dt.timezone.utc)
        return _json(200, {"token": tok, "access_token": tok, "expires_in": self.token_ttl,
                           "issued_at": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")})


class BlobCDN:
    """pkg-containers.githubusercontent.com: serves ghcr.io blobs behind
    signed, expiring URLs (Azure-SAS-like query)."""

    URL_TTL = 600

    def __init__(self, host: str, secret: bytes) -> None:
        self.host = host
        self._secret = secret
        self._lock = threading.Lock()
        self.blobs: dict[str, Blob] = {}
        self._expired_left = 0  # knob: next N signed URLs carry a past se=
        self.url_ttl = self.URL_TTL

    def add_blob(self, blob: Blob) -> None:
        with self._lock:
            self.blobs[blob.digest] = blob

    def expire_next(self, n: int = 1) -> None:
        with self._lock:
            self._expired_left = max(0, int(n))

    def _sign(self, digest: str, se: str, nonce: bytes) -> str:
        mac = hmac.new(self._secret, f"{digest}\n{se}\n".encode() + nonce, hashlib.sha256).digest()
        return base64.b64encode(nonce + mac[:24]).decode()

    def signed_url(self, digest: str) -> str:
        with self._lock:
            expired = self._expired_left > 0
            if expired:
                self._expired_left -= 1
        now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
        se_t = now - _dt.timedelta(minutes=10) if expired else now + _dt.timedelta(seconds=self.url_ttl)
        se = rfc3339(se_t)
        sig = self._sign(digest, se, os.urandom(9))
        return (f"https://{self.host}/ghcr1/blobs/{digest}?se={quote(se, safe='')}&sig={quote(sig, safe='')}"
                f"&sp=r&spr=https&sr=b&sv=2019-12-12")

    def _auth_error(self, msg: str) -> Response:
        body = ('<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed</Code>'
                f"<Message>Server failed to authenticate the request. {msg}</Message></Error>")
        return Response(403, [("Content-Type", "application/xml"), ("x-ms-error-code", "AuthenticationFailed")],
                        body.encode(), note=msg)

    async def handle(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return text_response(405, "method not allowed\n")
        m = re.fullmatch(r"/ghcr1/blobs/(sha256:[0-9a-f]{64})", req.path)
        if not m:
            return Response(404, [("Content-Type", "application/xml")],
                            b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ResourceNotFound</Code></Error>')
        digest = m.group(1)
        se, sig = req.param("se"), req.param("sig")
        if not se or not sig:
            return self._auth_error("Signature fields not well formed.")
        try:
            raw = base64.b64decode(sig)
        except ValueError:
            return self._auth_error("Signature fields not well formed.")
        nonce = raw[:9]
        if not hmac.compare_digest(self._sign(digest, se, nonce), sig):
            return self._auth_error("Signature did not match.")
        try:
            se_t = _dt.datetime.strptime(se, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc)
        except ValueError:
            return self._auth_error("Signature fields not well formed.")
        if se_t < _dt.datetime.now(_dt.timezone.utc):
            return self._auth_error("Signed expiry time has passed")
        with self._lock:
            blob = self.blobs.get(digest)
        if blob is None:
            return Response(404, [("Content-Type", "application/xml")],
                            b'<?xml version="1.0" encoding="utf-8"?><Error><Code>BlobNotFound</Code></Error>')
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("ETag", '"0x8DC' + blob.hex[:12].upper() + '"'),
            ("Last-Modified", email.utils.formatdate(1_700_000_000, usegmt=True)),
            ("x-ms-blob-type", "BlockBlob"),
            ("x-ms-version", "2019-12-12"),
        ]
        return serve_bytes(req, blob.view(), headers, ranged=True)


# ==================================================================== GitHub
VEX_OWNER_REPO = "aquasecurity/vexhub"
VEX_ARCHIVE_URL = "https://github.com/aquasecurity/vexhub/archive/refs/heads/main.tar.gz//vexhub-main"


def vex_repository_manifest(update_interval: str = "24h") -> dict:
    return {
        "name": "VEX Hub",
        "description": "Emulated VEX Hub (trivy-gateway test world)",
        "versions": [
            {
                "spec_version": "0.1",
                "locations": [{"url": VEX_ARCHIVE_URL}],
                "update_interval": update_interval,
            }
        ],
    }


class GitHub:
    """api.github.com, raw.githubusercontent.com, github.com, codeload.github.com."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.files: dict[str, bytes] = {}  # path in repo (branch main) -> content
        self.archive: bytes = b""
        self.archive_etag = ""
        self.set_manifest(vex_repository_manifest())
        self.files["README.md"] = b"# VEX Hub (emulated)\n"
        # rate limiting of api.github.com (None = unlimited)
        self._rl_budget: int | None = None
        self.rl_limit = 60
        self.api_calls = 0

    def set_manifest(self, manifest: dict) -> None:
        with self._lock:
            self.files["vex-repository.json"] = (json.dumps(manifest, indent=2) + "\n").encode()

    def set_archive(self, data: bytes) -> None:
        with self._lock:
            self.archive = data
            self.archive_etag = '"' + hashlib.sha1(data).hexdigest() + '"'

    def rate_limit(self, allowed_calls: int | None) -> None:
        """Allow *allowed_calls* more API calls, then 403 rate limit (None = off)."""
        with self._lock:
            self._rl_budget = None if allowed_calls is None else max(0, int(allowed_calls))

    # ---------------------------------------------------------------- API
    def _rl_headers(self, remaining: int) -> list[tuple[str, str]]:
        reset = int(time.time()) + 3600
        limit = self.rl_limit if self._rl_budget is not None else 5000
        return [
            ("X-RateLimit-Limit", str(limit)),
            ("X-RateLimit-Remaining", str(max(0, remaining))),
            ("X-RateLimit-Reset", str(reset)),
            ("X-RateLimit-Used", str(max(0, limit - remaining))),
            ("X-RateLimit-Resource", "core"),
            ("X-GitHub-Api-Version-Selected", "2022-11-28"),
        ]

    async def api(self, req: Request) -> Response:
        with self._lock:
            self.api_calls += 1
            if self._rl_budget is None:
                remaining = 4999
                limited = False
            elif self._rl_budget <= 0:
                remaining, limited = 0, True
            else:
                self._rl_budget -= 1
                remaining, limited = self._rl_budget, False
        rl = self._rl_headers(remaining)
        if limited:
            return _json(403, {
                "message": "API rate limit exceeded for 127.0.0.1. (But here's the good news: Authenticated "
                           "requests get a higher rate limit. Check out the documentation for more details.)",
                "documentation_url": "https://docs.github.com/rest/overview/resources-in-the-rest-api#rate-limiting",
            }, rl, "application/json; charset=utf-8")
        prefix = f"/repos/{VEX_OWNER_REPO}/contents"
        if req.method not in ("GET", "HEAD"):
            return _json(404, {"message": "Not Found"}, rl)
        if req.path in (prefix, prefix + "/", prefix + "/."):
            return _json(200, self._listing(), rl, "application/json; charset=utf-8")
        if req.path.startswith(prefix + "/"):
            name = req.path[len(prefix) + 1:]
            with self._lock:
                data = self.files.get(name)
            if data is not None:
                entry = self._entry(name, data)
                entry["content"] = base64.encodebytes(data).decode()
                entry["encoding"] = "base64"
                return _json(200, entry, rl, "application/json; charset=utf-8")
        if req.path == f"/repos/{VEX_OWNER_REPO}":
            return _json(200, {"full_name": VEX_OWNER_REPO, "default_branch": "main"}, rl)
        return _json(404, {"message": "Not Found",
                           "documentation_url": "https://docs.github.com/rest"}, rl,
                     "application/json; charset=utf-8")

    def _entry(self, name: str, data: bytes | None) -> dict:
        owner, repo = VEX_OWNER_REPO.split("/")
        sha = hashlib.sha1(b"blob %d\0" % len(data or b"") + (data or b"")).hexdigest()
        api = f"https://api.github.com/repos/{VEX_OWNER_REPO}/contents/{name}?ref=main"
        html = f"https://github.com/{VEX_OWNER_REPO}/blob/main/{name}"
        return {
            "name": name,
            "path": name,
            "sha": sha,
            "size": len(data) if data is not None else 0,
            "url": api,
            "html_url": html,
            "git_url": f"https://api.github.com/repos/{VEX_OWNER_REPO}/git/blobs/{sha}",
            "download_url": (f"https://raw.githubusercontent.com/{owner}/{repo}/main/{name}"
                             if data is not None else None),
            "type": "file" if data is not None else "dir",
            "_links": {"self": api, "git": f"https://api.github.com/repos/{VEX_OWNER_REPO}/git/blobs/{sha}",
                       "html": html},
        }

    def _listing(self) -> list[dict]:
        with self._lock:
            files = dict(self.files)
        out = [self._entry(n, d) for n, d in sorted(files.items())]
        out.append(self._entry("pkg", None))
        return out

    # ---------------------------------------------------------------- raw
    async def raw(self, req: Request) -> Response:
        prefix = f"/{VEX_OWNER_REPO}/main/"
        if req.method in ("GET", "HEAD") and req.path.startswith(prefix):
            with self._lock:
                data = self.files.get(req.path[len(prefix):])
            if data is not None:
                etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                if req.header("if-none-match") == etag:
                    return Response(304, [("ETag", etag)])
                return Response(200, [("Content-Type", "text/plain; charset=utf-8"), ("ETag", etag),
                                      ("Cache-Control", "max-age=300")], data)
        return text_response(404, "404: Not Found")

    # ------------------------------------------------------------- github.com
    async def web(self, req: Request) -> Response:
        if req.path == f"/{VEX_OWNER_REPO}/archive/refs/heads/main.tar.gz":
            loc = f"https://codeload.github.com/{VEX_OWNER_REPO}/tar.gz/refs/heads/main"
            return Response(302, [("Content-Type", "text/html; charset=utf-8"), ("Location", loc)], b"")
        if req.path in (f"/{VEX_OWNER_REPO}", f"/{VEX_OWNER_REPO}/"):
            return text_response(200, "<html><body>aquasecurity/vexhub (emulated)</body></html>",
                                 "text/html; charset=utf-8")
        return text_response(404, "Not Found", "text/html; charset=utf-8")

    # --------------------------------------------------------------- codeload
    async def codeload(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD") or req.path != f"/{VEX_OWNER_REPO}/tar.gz/refs/heads/main":
            return text_response(404, "404: Not Found")
        with self._lock:
            data, etag = self.archive, self.archive_etag
        headers = [
            ("Content-Type", "application/x-gzip"),
            ("Content-Disposition", "attachment; filename=vexhub-main.tar.gz"),
            ("ETag", etag),
            ("Vary", "Authorization,Accept-Encoding,Origin"),
            ("Access-Control-Allow-Origin", "https://render.githubusercontent.com"),
        ]
        inm = req.header("if-none-match")
        if inm and etag in [t.strip() for t in inm.split(",")]:
            return Response(304, [("ETag", etag)], b"")
        return Response(200, headers, data)


# ===================================================================== Maven
class Maven:
    def __init__(self, poms: dict[str, str | bytes]) -> None:
        self._lock = threading.Lock()
        self.files: dict[str, bytes] = {}
        for p, c in poms.items():
            self.put(p, c)

    def put(self, path: str, content: str | bytes) -> None:
        """Add a file under /maven2/ (path relative to /maven2/)."""
        data = content.encode() if isinstance(content, str) else content
        with self._lock:
            self.files[path.lstrip("/")] = data

    async def handle(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD") or not req.path.startswith("/maven2/"):
            return text_response(404, "Not Found")
        rel = req.path[len("/maven2/"):]
        with self._lock:
            data = self.files.get(rel)
            if data is None:
                for suffix, algo in ((".sha1", "sha1"), (".md5", "md5"), (".sha256", "sha256")):
                    if rel.endswith(suffix) and rel[: -len(suffix)] in self.files:
                        data = hashlib.new(algo, self.files[rel[: -len(suffix)]]).hexdigest().encode()
                        break
        if data is None:
            return text_response(404, "Not Found")
        ctype = "text/xml" if rel.endswith((".pom", ".xml")) else "application/octet-stream"
        etag = '"' + hashlib.md5(data).hexdigest() + '"'
        headers = [("Content-Type", ctype), ("ETag", etag),
                   ("Last-Modified", email.utils.formatdate(1_700_000_000, usegmt=True)),
                   ("X-Checksum-SHA1", hashlib.sha1(data).hexdigest())]
        if req.header("if-none-match") == etag:
            return Response(304, [("ETag", etag)])
        return Response(200, headers, data)


# ============================================================ check.trivy.dev
class VersionCheck:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.payload = {
            "trivy": {"latest_version": "0.76.0", "latest_date": "2026-11-01T00:00:00Z"},
            "announcements": [],
            "warnings": [],
        }

    def set_payload(self, payload: dict) -> None:
        with self._lock:
            self.payload = payload

    async def handle(self, req: Request) -> Response:
        if req.path != "/updates" or req.method not in ("GET", "HEAD"):
            return text_response(404, "404 page not found\n")
        with self._lock:
            body = json.dumps(self.payload, separators=(",", ":")).encode()
        return Response(200, [("Content-Type", "application/json")], body)
