"""Mirror requests → the upstream request each stands for (pure: no I/O, table-testable).

The mirror door speaks three protocols a scanner can be pointed at without trusting the
gateway's CA; each request maps onto the https URL the proxy door would have seen for the same
bytes, so both doors share one cache (same keys) and one fetch path:

* OCI distribution, read-only: ``/v2/`` (the ping), ``/v2/<name>/manifests/<tag|digest>`` and
  ``/v2/<name>/blobs/<digest>``. ``<name>`` is either ``<registry>/<repository>`` (what
  ``registry.mirrors`` in trivy.yaml produces) or a short name from ``mirror.oci.short_names``
  (``--db-repository gateway:5000/aquasec/trivy-db:2``).
* Maven: ``/<path name>/<group path>/<artifact>/<version>/<file>`` → a ``cache.maven`` repository.
* VEX repository: ``/vex/<name>/.well-known/vex-repository.json`` and the archives it lists.

Anything else — names the configuration does not allow, malformed names, references and
digests, path traversal, percent-encoded paths, other methods — raises :class:`RouteError`
before anything is fetched or stored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from ..hostport import registry_problem
from ..settings import Settings


class RouteKind(StrEnum):
    OCI_PING = "oci_ping"
    OCI = "oci"
    MAVEN = "maven"
    VEX_MANIFEST = "vex_manifest"
    VEX_ARCHIVE = "vex_archive"


class Protocol(StrEnum):
    """Which error format a refusal is written in."""

    OCI = "oci"
    PLAIN = "plain"


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    #: the upstream ``host[:port]`` (https) and origin-form target this request stands for
    host: str = ""
    target: str = ""
    #: VEX: the configured repository name and, for archives, (version index, location index)
    vex_name: str = ""
    vex_location: tuple[int, int] = (0, 0)


class RouteError(Exception):
    """A request the mirror door refuses; ``code`` is the OCI error code for registry clients."""

    def __init__(self, status: int, code: str, message: str, protocol: Protocol) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.protocol = protocol


#: the distribution spec's repository name grammar
_NAME = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_REGISTRY_HOST = re.compile(r"^[a-z0-9]+(?:[.-][a-z0-9]+)*\.[a-z0-9-]+$|^localhost$")
#: one Maven path segment (group ids, artifact ids, versions, file names)
_MAVEN_SEGMENT = re.compile(r"^[A-Za-z0-9_+~-][A-Za-z0-9._+~-]*$")
_ARCHIVE_FILE = re.compile(r"^[A-Za-z0-9_.-]+$")
#: longest request target the door accepts (OCI names are capped at 255 characters by registries)
MAX_TARGET = 2048
WELL_KNOWN = "/.well-known/vex-repository.json"


def route(method: str, target: str, settings: Settings) -> Route:
    """The :class:`Route` for one mirror request, or :class:`RouteError`."""
    path = target.split("?", 1)[0]
    protocol = Protocol.OCI if path == "/v2" or path.startswith("/v2/") else Protocol.PLAIN
    if len(target) > MAX_TARGET:
        raise RouteError(414, "NAME_INVALID", f"request target longer than {MAX_TARGET} bytes",
                         protocol)
    if not path.startswith("/") or "%" in path or "\\" in path:
        raise RouteError(400, "NAME_INVALID", "the path must be plain (no percent-encoding, no "
                         "backslashes)", protocol)
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments):
        raise RouteError(400, "NAME_INVALID", "path traversal (. or .. segments) is refused",
                         protocol)
    if method not in ("GET", "HEAD"):
        raise RouteError(405, "UNSUPPORTED", f"the mirror is read-only: {method} is not served "
                         "(GET and HEAD are)", protocol)
    if protocol is Protocol.OCI:
        return _oci(path, settings)
    if segments[0] == "vex":
        return _vex(segments[1:], settings)
    return _maven(segments, settings)


def _oci(path: str, settings: Settings) -> Route:
    if path in ("/v2", "/v2/"):
        return Route(RouteKind.OCI_PING)
    rest = path[len("/v2/"):]
    for what in ("/manifests/", "/blobs/"):
        name, sep, ref = rest.rpartition(what)
        if sep:
            break
    else:
        raise RouteError(404, "UNSUPPORTED", "the mirror serves /v2/<name>/manifests/<reference> "
                         "and /v2/<name>/blobs/<digest> only", Protocol.OCI)
    # a path-prefix name may start with a registry on a non-default port
    # (``registry.corp:5000/team/db``): the port is not part of the OCI name grammar
    first, _, remainder = name.partition("/")
    checked = remainder if ":" in first and registry_problem(first) is None else name
    if not _NAME.match(checked) or len(name) > 255:
        raise RouteError(400, "NAME_INVALID", f"invalid repository name {name[:200]!r}",
                         Protocol.OCI)
    if what == "/blobs/" or ref.startswith("sha256:") or ":" in ref:
        if not _DIGEST.match(ref):
            msg = (f"unsupported digest algorithm in {ref[:100]!r} (sha256 only)"
                   if _ANY_DIGEST.match(ref) else f"invalid digest {ref[:100]!r}")
            raise RouteError(400, "DIGEST_INVALID", msg, Protocol.OCI)
    elif not _TAG.match(ref):
        raise RouteError(400, "MANIFEST_INVALID", f"invalid tag {ref[:100]!r}", Protocol.OCI)
    registry, repository = _resolve_name(name, settings)
    return Route(RouteKind.OCI, registry, f"/v2/{repository}{what}{ref}")


def _resolve_name(name: str, settings: Settings) -> tuple[str, str]:
    """``registry/repository`` (path-prefix form) or a short name → (registry, repository)."""
    short = settings.mirror.oci.short_names.get(name)
    if short is not None:
        registry, _, repository = short.partition("/")
        return registry, repository
    first, _, repository = name.partition("/")
    oci = settings.cache.oci
    # Docker's rule: a first segment with a dot or a port (or localhost) names a registry
    registry_like = _REGISTRY_HOST.match(first) or (":" in first and not registry_problem(first))
    if registry_like and repository:
        if f"{first}/{repository}" in oci.public_repositories and first in oci.registries:
            return first, repository
        raise RouteError(404, "NAME_UNKNOWN", f"{name} is not served by this mirror: add it to "
                         "cache.oci.public_repositories (and its registry to cache.oci.registries) "
                         "in the gateway configuration", Protocol.OCI)
    raise RouteError(404, "NAME_UNKNOWN", f"{name} is not served by this mirror: use "
                     "<registry>/<repository> (e.g. mirror.gcr.io/aquasec/trivy-db) or add a "
                     "short name to mirror.oci.short_names in the gateway configuration",
                     Protocol.OCI)


def _maven(segments: list[str], settings: Settings) -> Route:
    # the longest configured path name that prefixes the path
    for count in range(len(segments) - 1, 0, -1):
        name = "/".join(segments[:count])
        repo = settings.mirror.maven.get(name)
        if repo is None:
            continue
        rest = segments[count:]
        if not rest or not all(_MAVEN_SEGMENT.match(s) for s in rest):
            raise RouteError(400, "NAME_INVALID", "invalid Maven path: segments of letters, "
                             "digits and . _ - + ~ only", Protocol.PLAIN)
        host, _, prefix = repo.strip("/").partition("/")
        return Route(RouteKind.MAVEN, host, f"/{prefix}/" + "/".join(rest))
    names = ", ".join(f"/{n}/" for n in settings.mirror.maven) or "none configured"
    raise RouteError(404, "NAME_UNKNOWN", "not served by this mirror: Maven repositories are "
                     f"under {names} (mirror.maven), VEX repositories under /vex/<name>/ "
                     "(mirror.vex), OCI under /v2/", Protocol.PLAIN)


def _vex(segments: list[str], settings: Settings) -> Route:
    name = segments[0] if segments else ""
    if name not in settings.mirror.vex:
        known = ", ".join(f"/vex/{n}" for n in settings.mirror.vex) or "none configured"
        raise RouteError(404, "NAME_UNKNOWN", f"no VEX repository {name[:100]!r} here (served: "
                         f"{known}; add one to mirror.vex in the gateway configuration)",
                         Protocol.PLAIN)
    rest = "/" + "/".join(segments[1:])
    if rest == WELL_KNOWN:
        return Route(RouteKind.VEX_MANIFEST, vex_name=name)
    parts = segments[1:]
    if (len(parts) == 4 and parts[0] == "archive" and parts[1].isdigit() and parts[2].isdigit()
            and len(parts[1]) < 4 and len(parts[2]) < 4 and _ARCHIVE_FILE.match(parts[3])):
        return Route(RouteKind.VEX_ARCHIVE, vex_name=name,
                     vex_location=(int(parts[1]), int(parts[2])))
    raise RouteError(404, "NAME_UNKNOWN", f"not part of VEX repository {name}: it serves "
                     f"{WELL_KNOWN} and the archives listed there", Protocol.PLAIN)


def archive_path(name: str, version: int, location: int, filename: str) -> str:
    """The door's own path for one archive location of a VEX repository manifest."""
    safe = filename if _ARCHIVE_FILE.match(filename or "") else "archive.tar.gz"
    return f"/vex/{name}/archive/{version}/{location}/{safe}"


def split_location(url: str) -> tuple[str, str]:
    """go-getter's ``<archive url>//<subdir>`` → (archive url, "//subdir" or "")."""
    scheme_end = url.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else 0
    cut = url.find("//", start)
    if cut < 0:
        return url, ""
    return url[:cut], url[cut:]
