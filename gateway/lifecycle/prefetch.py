"""Prefetch: fetch a new generation of each watched artifact before any scanner asks for it.

For every artifact in ``lifecycle.prefetch.artifacts`` a check runs every ``interval`` (± jitter):

- **oci**: the tag manifest is requested *revalidating* (a conditional request; 304 when the tag
  has not moved), with Trivy's own ``Accept`` so the tag entry it refreshes is the very one Trivy's
  requests hit. When the tag points at a digest whose layers are not all cached, every layer is
  fetched. Generations are remembered newest first; beyond ``keep`` the oldest are evicted
  (their manifests and layers, unless a kept generation shares them).
- **vex_hub**: the archive URL is revalidated, its redirect followed (github.com → codeload),
  so the cached archive is the newest.

Why through :class:`~gateway.pipeline.Pipeline` (an :class:`~gateway.exchange.Exchange` like the
proxy builds): everything a client request gets applies unchanged — single flight (a scanner
asking at the same moment shares the fetch), the circuit breakers and per-host rate limits (the
budget is shared with client traffic, so a rate-limited upstream is not hit harder), failover
groups, digest verification before publish (a corrupt layer is never stored; the check fails and
is retried at the next interval). The allowlist is asked first: a host it does not intercept is
never prefetched. Its requests carry ``Origin.PREFETCH``: the pipeline counts their cache results
in trivy_gateway_prefetch_cache_requests_total, not among the clients' (the hit ratio).

The clock, the sleep and the random source are injectable; :meth:`Prefetcher.trigger` runs
every check at once (tests, and an operator's "check now").
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from enum import StrEnum
from typing import Awaitable, Callable, Optional

from multidict import CIMultiDict

from ..cache import BlobStore, EntryStore, FillFailed
from ..exchange import Exchange, Origin, Response
from ..hostport import split_authority
from ..observability.logging import get_logger
from ..observability.metrics import Metrics
from ..policy import ACTION_INTERCEPT, Policy
from ..resources import classify
from ..settings import CacheSettings, PrefetchArtifactSettings, PrefetchSettings, PrefetchSource
from .freshness import (CREATED_ANNOTATION, NEXT_UPDATE_ANNOTATIONS, ArtifactState, Freshness,
                        Generation, read_db_metadata)

log = get_logger("gateway.lifecycle")

#: what Trivy 0.76 sends on a manifest GET (docs: trivy-traffic.md), verbatim: the tag entry's
#: cache key contains the normalised Accept, so the prefetched entry is the one Trivy hits
TRIVY_MANIFEST_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v1+json,"
    "application/vnd.docker.distribution.manifest.v1+prettyjws,"
    "application/vnd.docker.distribution.manifest.v2+json,"
    "application/vnd.oci.image.manifest.v1+json,"
    "application/vnd.docker.distribution.manifest.list.v2+json,"
    "application/vnd.oci.image.index.v1+json")
USER_AGENT = "trivy-gateway-prefetch"
MAX_MANIFEST = 4 * 1024 * 1024
MAX_REDIRECTS = 3


class CheckResult(StrEnum):
    """Outcome of one check (the ``result`` label of trivy_gateway_prefetch_checks_total)."""

    UNCHANGED = "unchanged"
    FETCHED = "fetched"
    FAILED = "failed"
    DENIED = "denied"


class PrefetchFailed(Exception):
    """One check could not complete; the message is for the log and the status page."""


class _Denied(Exception):
    pass


Handle = Callable[..., Awaitable[Response]]


class Prefetcher:
    def __init__(self, settings: PrefetchSettings, cache: CacheSettings, handle: Handle,
                 policy: Policy, entries: EntryStore, blobs: BlobStore, metrics: Metrics,
                 freshness: Freshness, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.cache = cache
        self.handle = handle
        self.policy = policy
        self.entries = entries
        self.blobs = blobs
        self.metrics = metrics
        self.freshness = freshness
        self.clock = clock
        self.sleep = sleep
        self.rand = rand
        self.watched = {name: art for name, art in settings.artifacts.items() if art.enabled}
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    # -- scheduling ---------------------------------------------------------------------------
    def _jittered(self, interval: float) -> float:
        j = self.settings.jitter
        return interval * (1 - j + 2 * j * self.rand())

    def start(self) -> None:
        self.freshness.load({n: a.reference for n, a in self.watched.items()})
        if self.watched:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="prefetch")

    def trigger(self) -> None:
        """Check every artifact now (then continue on the usual schedule)."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        now = self.clock()
        # the first round is spread over the jitter window, so replicas do not start in lockstep
        due = {n: now + self.settings.interval_of(a) * self.settings.jitter * self.rand()
               for n, a in self.watched.items()}
        while True:
            for name in sorted(n for n, t in due.items() if t <= self.clock()):
                try:
                    await self.check(name)
                except Exception:  # noqa: BLE001 - a bug in one check must not end the watch
                    log.exception("prefetch_check_crashed", artifact=name)
                due[name] = self.clock() + self._jittered(self.settings.interval_of(
                    self.watched[name]))
            wait = max(0.0, min(due.values()) - self.clock())
            log.debug("prefetch_wait", seconds=wait)
            sleeper = asyncio.ensure_future(self.sleep(wait))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()
            if self._wake.is_set():
                self._wake.clear()
                due = dict.fromkeys(due, 0.0)

    # -- one check ----------------------------------------------------------------------------
    async def check(self, name: str) -> CheckResult:
        """Check one artifact; returns the result label (never raises, except cancellation)."""
        art = self.watched[name]
        state = self.freshness.artifacts[name]
        log.debug("prefetch_check", artifact=name, reference=art.reference)
        try:
            if art.source == PrefetchSource.VEX_HUB:
                result = await self._check_archive(art, state)
            else:
                result = await self._check_oci(art, state)
            state.consecutive_failures = 0
            state.last_error = ""
            state.last_success = self.clock()
        except _Denied as exc:
            result = CheckResult.DENIED
            state.last_error = str(exc)
            log.warning("prefetch_denied", artifact=name, reason=str(exc))
        except (PrefetchFailed, FillFailed, OSError) as exc:
            result = CheckResult.FAILED
            state.consecutive_failures += 1
            state.last_error = str(exc) or type(exc).__name__
            log.warning("prefetch_failed", artifact=name, reference=art.reference,
                        error=state.last_error, failures=state.consecutive_failures)
        state.last_result = result
        self.metrics.prefetch_checks.labels(name, result).inc()
        self.freshness.update_metrics(state)
        try:
            self.freshness.save()
        except OSError as exc:
            log.warning("prefetch_state_not_saved", error=str(exc))
        return result

    def _allowed(self, host: str) -> None:
        """``host`` is ``host[:port]`` (a registry on a non-default port, gateway.hostport)."""
        name, port = split_authority(host)
        decision = self.policy.decide(name, port or 443)
        if decision.action != ACTION_INTERCEPT:
            raise _Denied(f"{host} is not intercepted by the allowlist ({decision.action}: "
                          f"{decision.reason})")

    def _exchange(self, host: str, target: str, accept: Optional[str] = None) -> Exchange:
        headers = CIMultiDict({"User-Agent": USER_AGENT})
        if accept:
            headers["Accept"] = accept
        name, port = split_authority(host)
        return Exchange("GET", "https", name, port or 443, target, headers, client="prefetch",
                        origin=Origin.PREFETCH)

    async def _get(self, ex: Exchange, *, revalidate: bool, keep: int = 0,
                   sha256: Optional["hashlib._Hash"] = None) -> tuple[Response, bytes, int]:
        """Send through the pipeline; returns the response, up to ``keep`` bytes of its body,
        and the body's length. Raises PrefetchFailed when the upstream could not be asked."""
        resp = await self.handle(ex, revalidate=revalidate)
        kept = bytearray()
        total = 0
        try:
            async for chunk in resp.body.chunks():
                total += len(chunk)
                if sha256 is not None:
                    sha256.update(chunk)
                if len(kept) < keep:
                    kept += chunk[:keep - len(kept)]
        finally:
            await resp.body.close()
        if ex.notes.get("cache") == "stale" or ex.notes.get("cache") == "error":
            why = ex.notes.get("upstream_error") or ex.notes.get("upstream_status") or resp.status
            raise PrefetchFailed(f"{ex.url}: upstream unavailable ({why}); the cached "
                                 "generation stays served")
        return resp, bytes(kept), total

    async def _check_oci(self, art: PrefetchArtifactSettings, state: ArtifactState) -> CheckResult:
        self._allowed(art.host)
        repo = art.repository
        ex = self._exchange(art.host, f"/v2/{repo}/manifests/{art.tag}", TRIVY_MANIFEST_ACCEPT)
        resp, body, total = await self._get(ex, revalidate=True, keep=MAX_MANIFEST)
        if resp.status != 200 or total > MAX_MANIFEST:
            raise PrefetchFailed(f"{art.reference}: manifest answered {resp.status}")
        now = self.clock()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        state.checked_at = now
        if digest != state.upstream_digest:
            state.upstream_changed_at = now
        state.upstream_digest = digest
        layers, annotations = await self._layers(art, body)
        missing = [d for d, _ in layers if not await self._cached(art.host, repo, d)]
        if not missing and state.served_digest == digest:
            return CheckResult.UNCHANGED
        fetched = 0
        for layer, size in layers:
            if layer not in missing:
                continue
            log.info("prefetch_layer", artifact=state.name, digest=layer, size=size)
            lex = self._exchange(art.host, f"/v2/{repo}/blobs/{layer}")
            lresp, _, n = await self._get(lex, revalidate=False)
            if lresp.status != 200 or (size is not None and n != size):
                raise PrefetchFailed(f"{art.reference}: layer {layer} answered {lresp.status} "
                                     f"with {n} bytes")
            fetched += n
        self.metrics.prefetch_bytes.labels(state.name).inc(fetched)
        meta = await self._metadata(layers[0][0]) if layers else {}
        self._served(state, Generation(
            digest, [d for d, _ in layers], sum(s or 0 for _, s in layers), now,
            meta.get("UpdatedAt") or annotations.get(CREATED_ANNOTATION),
            meta.get("NextUpdate")
            or next((annotations[k] for k in NEXT_UPDATE_ANNOTATIONS if k in annotations), None)))
        await self._evict_old(state)
        log.info("prefetch_fetched", artifact=state.name, reference=art.reference, digest=digest,
                 bytes=fetched)
        return CheckResult.FETCHED

    async def _metadata(self, layer: str) -> dict:
        """UpdatedAt/NextUpdate from the cached layer's metadata.json, when cheap to read."""
        path = self.blobs.pin(layer)
        if path is None:
            return {}
        try:
            meta = await asyncio.to_thread(read_db_metadata, path) or {}
        finally:
            self.blobs.unpin(layer)
        return {k: v for k, v in meta.items() if k in ("UpdatedAt", "NextUpdate")
                and isinstance(v, str)}

    async def _layers(self, art: PrefetchArtifactSettings,
                      body: bytes) -> tuple[list[tuple[str, Optional[int]]], dict]:
        """(digest, size) of every layer, following an index to its manifests."""
        try:
            doc = json.loads(body)
        except ValueError:
            raise PrefetchFailed(f"{art.reference}: the manifest is not JSON") from None
        layers = [(d["digest"], d.get("size")) for d in doc.get("layers") or []
                  if isinstance(d, dict) and isinstance(d.get("digest"), str)]
        for child in doc.get("manifests") or []:
            if not isinstance(child, dict) or not isinstance(child.get("digest"), str):
                continue
            cex = self._exchange(art.host, f"/v2/{art.repository}/manifests/{child['digest']}",
                                 TRIVY_MANIFEST_ACCEPT)
            cresp, cbody, _ = await self._get(cex, revalidate=False, keep=MAX_MANIFEST)
            if cresp.status != 200:
                raise PrefetchFailed(f"{art.reference}: manifest {child['digest']} answered "
                                     f"{cresp.status}")
            child_layers, _ = await self._layers(art, cbody)
            layers += child_layers
        return layers, doc.get("annotations") or {}

    async def _cached(self, host: str, repo: str, digest: str) -> bool:
        res = classify("GET", host, f"/v2/{repo}/blobs/{digest}", "", {}, self.cache,
                       scheme="https")
        return res.cache_key is not None and await self.entries.get(res.cache_key) is not None

    async def _check_archive(self, art: PrefetchArtifactSettings, state: ArtifactState) -> CheckResult:
        url = art.reference
        for _ in range(MAX_REDIRECTS + 1):
            _, _, host, rest = url.split("/", 3)
            path = "/" + rest
            self._allowed(host)
            sha = hashlib.sha256()
            ex = self._exchange(host, path)
            resp, _, total = await self._get(ex, revalidate=True, sha256=sha)
            if resp.status in (301, 302, 307, 308) and resp.headers.get("Location", "").startswith(
                    "https://"):
                url = resp.headers["Location"]
                continue
            if resp.status != 200:
                raise PrefetchFailed(f"{url}: answered {resp.status}")
            break
        else:
            raise PrefetchFailed(f"{art.reference}: more than {MAX_REDIRECTS} redirects")
        now = self.clock()
        digest = "sha256:" + sha.hexdigest()
        state.checked_at = now
        if digest != state.upstream_digest:
            state.upstream_changed_at = now
        state.upstream_digest = digest
        if state.served_digest == digest:
            return CheckResult.UNCHANGED
        self.metrics.prefetch_bytes.labels(state.name).inc(total)
        self._served(state, Generation(digest, [], total, now))
        log.info("prefetch_fetched", artifact=state.name, reference=url, digest=digest,
                 bytes=total)
        return CheckResult.FETCHED

    # -- generations --------------------------------------------------------------------------
    def _served(self, state: ArtifactState, gen: Generation) -> None:
        state.served_digest = gen.digest
        state.fetched_at = gen.first_seen
        state.generations = [gen] + [g for g in state.generations if g.digest != gen.digest]

    async def _evict_old(self, state: ArtifactState) -> None:
        """Drop generations beyond ``keep``: their manifests and layers, unless kept ones share
        them. Tag entries are never touched (they point at the newest generation)."""
        keep = self.settings.keep
        old, state.generations = state.generations[keep:], state.generations[:keep]
        if not old:
            return
        kept = {d for g in state.generations for d in (g.digest, *g.layers)}
        drop = {d for g in old for d in (g.digest, *g.layers)} - kept
        removed = 0
        for entry in list(self.entries.iter_entries()):
            if entry.body_digest in drop and entry.kind in ("oci_manifest", "oci_blob") \
                    and "@sha256:" in str(entry.meta.get("reference") or "@sha256:"):
                await self.entries.delete(entry.key)
                removed += 1
        for digest in drop:
            self.blobs.remove(digest)
        log.info("prefetch_evicted_generations", artifact=state.name,
                 generations=[g.digest for g in old], entries=removed)

    def status(self) -> dict:
        self.freshness.refresh_metrics()
        return {"prefetch_enabled": bool(self.watched) and self._task is not None,
                "artifacts": self.freshness.status()}
