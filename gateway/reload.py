"""Live reload (SIGHUP, ``trivy-gateway reload``): what may change without a restart, and how.

Like ``nginx -s reload``: the configuration is read and validated again from the same sources
(the ``--config`` file, the process environment, the original flags). An invalid configuration
is refused with its errors and the running one stays. A valid one is split in two:

* keys listed in :data:`RELOADABLE` take effect for the *next* connection or request: policy
  rules, proxy auth, upstream credentials, retries, circuit and per-host limits, cache TTLs and
  staleness. They are swapped in one synchronous step (no ``await`` in between), so no request
  sees half of the old and half of the new configuration; transfers in flight keep the objects
  they started with;
* every other changed key (listen addresses, data dir, CA, cache size, upstream TLS trust,
  overrides, parent proxy, logging set-up, shared state ``cache.shared`` and
  ``server.workers``, …) needs a restart: it is reported and the running
  value is kept. Keys added later are in this group until listed here: safe by default.

Every settled configuration has a short digest (:func:`gateway.settings.settings_digest`), in the
``config_reloaded`` log line, in ``/api/status`` and in ``trivy_gateway_config_info``.
"""
from __future__ import annotations

import dataclasses
from enum import StrEnum
from typing import Any

from .settings import Settings

class ReloadResult(StrEnum):
    APPLIED = "applied"
    REFUSED = "refused"     # the new configuration was invalid; the running one stays


#: key paths (a section, or section.key) applied live
RELOADABLE = frozenset({
    "policy",
    "proxy.auth", "proxy.idle_timeout", "proxy.header_timeout", "proxy.max_header_bytes",
    "upstream.credentials", "upstream.retry", "upstream.circuit", "upstream.limits",
    "cache.oci", "cache.maven", "cache.github", "cache.generic", "cache.max_stale",
    "logging.access_log", "server.drain_grace",
})


def _changed_fields(old: Any, new: Any, path: str) -> list[str]:
    """Dotted paths of the top-level keys of a section that differ."""
    return [f"{path}.{f.name}" for f in dataclasses.fields(old)
            if getattr(old, f.name) != getattr(new, f.name)]


def split_changes(old: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """``(effective, applied, needs_restart)``: ``new`` with every non-reloadable change undone."""
    applied, restart = [], []
    sections = {}
    for f in dataclasses.fields(Settings):
        if f.metadata.get("internal"):
            continue
        name = f.name
        old_sec, new_sec = getattr(old, name), getattr(new, name)
        if old_sec == new_sec:
            continue
        if name in RELOADABLE:
            applied.append(name)
            continue
        keep = {}
        for path in _changed_fields(old_sec, new_sec, name):
            key = path.split(".", 1)[1]
            if path in RELOADABLE:
                applied.append(path)
            else:
                restart.append(path)
                keep[key] = getattr(old_sec, key)
        if keep:
            sections[name] = dataclasses.replace(new_sec, **keep)
    return dataclasses.replace(new, **sections), applied, restart
