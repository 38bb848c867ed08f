"""Cache keys of the first format (before issue 10 D3/D10) and what each may become now.

The first format had no scheme and no forwarded query in its keys (gateway 8a90204 and
earlier)::

    blob|<digest>|<scope>              manifest|<digest>|<scope>
    tag|<host>/<name>:<ref>|<accept>|<scope>
    oci-ping|<host>|<method>           oci-token|<host>|<path>?<query>
    maven|<host><path>                 github|<host><target>[|<accept>|<api version>]
    generic|<host><target>

Every one of them may have been fetched over plain HTTP: ``policy.allow_plain_http`` was on by
default and let an ``http://`` request reach every intercepted host, and nothing in an old entry
records the scheme. So an old entry becomes an ``https`` entry only when its content is proven
independently of the transport:

- blobs and manifests by digest: the body was verified against the digest the key names (the
  digest a request asks for is the whole identity of the content, whatever carried it);
- a tag manifest the gateway got by failover (the entry's ``host`` is another registry than the
  key's): failover URLs were always ``https://<registry>/v2/<repository>/manifests/<tag>``, with
  no query, so it maps to the new key of a request *without* a query (D10).

Everything else (tag manifests fetched from the key's own host, which may have carried a query
the old key dropped; tokens, pings, Maven, GitHub and generic responses) is dropped and fetched
again once over HTTPS: small files, where trusting a possibly forged answer would cost more than
one request each.
"""
from __future__ import annotations

import re
from typing import Optional

from ..cache.entries import Entry
from ..cache.keyformat import KeyUpgrade

#: the key format the current code stores under: 2 = scheme and forwarded query keyed
KEY_FORMAT = 2

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_BY_DIGEST = ("blob", "manifest")
_BY_URL = ("tag", "oci-ping", "oci-token", "maven", "github", "generic")


def is_legacy_key(key: str) -> bool:
    """Is ``key`` in the first format? (Current keys carry ``|https|``/``|http|`` after a
    digest kind and ``https://``/``http://`` after the others; a host never contains ``://``.)"""
    kind, sep, rest = key.partition("|")
    if not sep:
        return False
    if kind in _BY_DIGEST:
        return rest.startswith("sha256:")
    if kind in _BY_URL:
        return not rest.startswith(("https://", "http://"))
    return False


def upgrade_key(key: str, *, status: int, body_digest: Optional[str],
                served_by: Optional[str]) -> Optional[str]:
    """The current key for an entry stored under first-format ``key``, or None (drop it).

    ``body_digest``: the digest of the stored body; ``served_by``: the registry that answered
    (the entry's ``meta["host"]``)."""
    kind, _, rest = key.partition("|")
    if kind in _BY_DIGEST:
        digest, sep, scope = rest.partition("|")
        if sep and _DIGEST.fullmatch(digest) and status == 200 and body_digest == digest:
            return f"{kind}|https|{digest}|{scope}"
        return None
    if kind == "tag":
        host = rest.split("/", 1)[0]
        if status == 200 and body_digest and served_by and served_by != host:
            # tag|<host>/<name>:<ref>|<accept>|<scope> -> tag|https://<host>/<name>:<ref>|…
            return f"tag|https://{rest}"
    return None


def _new_key(entry: Entry) -> Optional[str]:
    return upgrade_key(entry.key, status=entry.status, body_digest=entry.body_digest,
                       served_by=(entry.meta or {}).get("host"))


#: what :func:`gateway.cache.keyformat.migrate_keys` applies at start-up
KEY_UPGRADE = KeyUpgrade(format=KEY_FORMAT, is_legacy=is_legacy_key, new_key=_new_key)
