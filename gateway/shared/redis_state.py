"""Shared state in Redis: circuit openings, the fleet budget per host, fill leases.

Every call is bounded (``socket_timeout``) and guarded: when Redis does not answer, this replica
logs ``shared_backend_unavailable`` once, sets ``trivy_gateway_shared_backend_up{backend="redis"}``
to 0 and behaves like :class:`~gateway.shared.state.LocalState` (leases granted, no fleet budget,
local circuits) — serving never depends on Redis. It tries Redis again at most every
:data:`RETRY_INTERVAL` seconds and logs ``shared_backend_recovered``.

Keys (one namespace, so one Redis can serve several gateways with different prefixes later)::

    trivy-gateway:lease:<sha256 of cache key>   holder JSON, PX = cache.shared.lease_ttl
    trivy-gateway:circuit:<host>                 {until (wall), status, why, replica}, PX = window
    trivy-gateway:budget:<host>                  token bucket hash {t, ts}, Redis server time
    trivy-gateway:peer-token                     random token peers present (set once)
    trivy-gateway:holders:<digest>               peer addresses whose local tier has the body
    trivy-gateway:replica:<id>                   a replica's status heartbeat (expires)
    channel trivy-gateway:circuits               circuit openings as they happen

Every key names one host or one cache key, so Redis Cluster can shard them (no multi-key ops).
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Awaitable, Callable, Optional, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..observability.logging import get_logger
from ..observability.metrics import Metrics
from ..settings import SharedSettings, UpstreamSettings
from ..upstream.circuit import OPEN, CircuitBreaker
from ..upstream.limiter import LimiterTimeout
from .availability import RETRY_INTERVAL, Availability
from .state import Holder, SharedState

log = get_logger("gateway.shared")

NS = "trivy-gateway:"
CHANNEL = NS + "circuits"
T = TypeVar("T")
#: a body's holder set is forgotten this long after its last addition (holders that evicted it
#: are removed when a reader finds them without it)
HOLDERS_TTL = 7 * 86400

# Token bucket on Redis's own clock (replicas' clocks may differ): returns 0 when a token was
# taken, else the milliseconds until one accrues. ARGV: rate per second, burst.
_TAKE = """
local rate = tonumber(ARGV[1]); local burst = tonumber(ARGV[2])
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(b[1]) or burst; local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) / 1000 * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / rate * 1000) end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 60000)
return wait
"""
# Compare-and-renew / compare-and-delete: only the holder extends or releases its lease.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Keep the longest circuit window in force: replace only when the new one ends later.
_CIRCUIT = """
local old = redis.call('GET', KEYS[1])
if old then
  local ok, d = pcall(cjson.decode, old)
  if ok and tonumber(d['until']) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""


class RedisState(SharedState):
    def __init__(self, cfg: SharedSettings, upstream_cfg: UpstreamSettings, metrics: Metrics,
                 peer_address: str = "", *, wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.upstream_cfg = upstream_cfg
        self.metrics = metrics
        self.replica_id = uuid.uuid4().hex[:12]
        self.me = Holder(self.replica_id, peer_address)
        self._me_raw = self.me.encode()
        self._wall = wall
        self._redis = aioredis.from_url(cfg.redis_url_with_password, socket_timeout=2.0,
                                        socket_connect_timeout=1.0, health_check_interval=5)
        self._take = self._redis.register_script(_TAKE)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._circuit = self._redis.register_script(_CIRCUIT)
        self._avail = Availability(
            "redis", self._safe_url(), metrics, errors=(RedisError,),
            effect="this replica works alone (own circuits, budget and fills) until Redis "
                   "answers again",
            on_recovered=lambda: self._spawn(self._load()))
        self._upstream = None
        self._listener: Optional[asyncio.Task] = None
        self._tasks: set[asyncio.Task] = set()
        #: a remote opening is being applied: its transition must not be sent back
        self._applying = False

    def set_peer_address(self, address: str) -> None:
        self.me = Holder(self.replica_id, address)
        self._me_raw = self.me.encode()

    # -- availability ------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self._avail.up

    def _guard(self, what: str, call: Callable[[], Awaitable[T]], default: T) -> Awaitable[T]:
        return self._avail.guard(what, call, default)

    def _safe_url(self) -> str:
        url = self.cfg.redis_url
        if "@" in url:
            scheme, _, rest = url.partition("://")
            url = f"{scheme}://…@{rest.rpartition('@')[2]}"
        return url

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, upstream) -> None:
        self._upstream = upstream
        upstream.on_circuit_change = self._circuit_changed
        upstream.fleet_budget = self._take_budget
        await self._load()
        self._listener = asyncio.get_running_loop().create_task(self._listen(),
                                                                name="shared circuits")

    async def _load(self) -> None:
        """Peer token and the circuits already open in the fleet (at start and on recovery)."""
        async def load() -> None:
            await self._redis.set(NS + "peer-token", secrets.token_urlsafe(32), nx=True)
            token = await self._redis.get(NS + "peer-token")
            self.peer_token = token.decode() if token else ""
            async for key in self._redis.scan_iter(match=NS + "circuit:*", count=100):
                raw = await self._redis.get(key)
                if raw:
                    self._apply_circuit(raw)
        await self._guard("load", load, None)

    async def close(self) -> None:
        if self._listener:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._redis.aclose()
        except (RedisError, OSError):
            pass

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- circuits ----------------------------------------------------------------------------
    def _circuit_changed(self, host: str, br: CircuitBreaker, old: str, new: str) -> None:
        if new != OPEN or self._applying:
            return
        left = br.remaining()
        if not left:
            return
        msg = json.dumps({"host": host, "until": self._wall() + left, "status": br.open_status,
                          "why": br.why, "replica": self.replica_id}, separators=(",", ":"))

        async def send() -> None:
            sent = await self._guard("circuit", lambda: self._circuit(
                keys=[NS + "circuit:" + host],
                args=[msg, self._wall() + left, int(left * 1000) + 1, CHANNEL]), 0)
            if sent:
                self.metrics.fleet_circuit_events.labels(direction="sent").inc()
        self._spawn(send())

    def _apply_circuit(self, raw: bytes | str) -> None:
        try:
            d = json.loads(raw)
            host, until, status, why, replica = (str(d["host"]), float(d["until"]),
                                                 int(d["status"]), str(d["why"]), str(d["replica"]))
        except (ValueError, KeyError, TypeError):
            return
        if replica == self.replica_id or self._upstream is None:
            return
        window = until - self._wall()
        if window <= 0:
            return
        br = self._upstream.breaker(host)
        before = (br.state, br.open_until)
        self._applying = True
        try:
            br.open_shared(window, status, f"{why} (seen by replica {replica})")
        finally:
            self._applying = False
        if (br.state, br.open_until) != before:
            self.metrics.fleet_circuit_events.labels(direction="received").inc()
            log.warning("circuit_opened_by_fleet", host=host, replica=replica,
                        open_seconds=round(window, 1), why=why)

    async def _listen(self) -> None:
        """Apply other replicas' circuit openings as they are published; reconnect forever."""
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                if not self._avail.up:
                    await self._guard("subscribe", self._redis.ping, None)
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if msg and msg.get("type") == "message":
                        self._apply_circuit(msg["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                self._avail.down("subscribe", exc)
                await asyncio.sleep(RETRY_INTERVAL)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass

    # -- fleet budget ------------------------------------------------------------------------
    async def _take_budget(self, host: str, timeout: float) -> None:
        """One token of the host's fleet bucket (``upstream.limits`` rate and burst, for the
        fleet); waits for it up to ``timeout`` (then :class:`LimiterTimeout`)."""
        lim = self.upstream_cfg.limit_for(host)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout
        key = NS + "budget:" + host
        for _ in range(10_000):  # bounded: each round waits for a token to accrue
            wait_ms = await self._guard("budget", lambda: self._take(
                keys=[key], args=[float(lim.rate), float(lim.burst)]), 0)
            if not wait_ms:
                self.metrics.fleet_budget_wait.labels(
                    host=self.metrics.host_label(host)).observe(loop.time() - started)
                return
            delay = int(wait_ms) / 1000
            if loop.time() + delay > deadline:
                raise LimiterTimeout()
            await asyncio.sleep(delay)
        raise LimiterTimeout()

    # -- presence ----------------------------------------------------------------------------
    async def heartbeat(self, info: dict, ttl: float) -> Optional[list[dict]]:
        """Publish this replica's view (expires after ``ttl`` unless renewed) and return every
        live replica's, for the fleet part of the status page; None while Redis is down."""
        async def beat() -> list[dict]:
            raw = json.dumps(info, separators=(",", ":"))
            await self._redis.set(NS + "replica:" + self.replica_id, raw, px=int(ttl * 1000))
            out = []
            async for key in self._redis.scan_iter(match=NS + "replica:*", count=100):
                value = await self._redis.get(key)
                if value:
                    try:
                        out.append(json.loads(value))
                    except ValueError:
                        continue
            return sorted(out, key=lambda r: str(r.get("replica")))
        return await self._guard("heartbeat", beat, None)

    # -- holders -------------------------------------------------------------------------------
    async def add_holder(self, digest: str, peer: str) -> None:
        key = NS + "holders:" + digest

        async def add() -> None:
            await self._redis.sadd(key, peer)
            await self._redis.expire(key, HOLDERS_TTL)
        await self._guard("holders", add, None)

    async def holders(self, digest: str) -> list[str]:
        found = await self._guard("holders", lambda: self._redis.smembers(
            NS + "holders:" + digest), set())
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in found)

    async def drop_holder(self, digest: str, peer: str) -> None:
        await self._guard("holders", lambda: self._redis.srem(NS + "holders:" + digest, peer), 0)

    # -- fill leases -------------------------------------------------------------------------
    async def acquire_lease(self, key_id: str) -> Optional[Holder]:
        key = NS + "lease:" + key_id
        ttl = int(self.cfg.lease_ttl * 1000)

        async def take() -> Optional[Holder]:
            if await self._redis.set(key, self._me_raw, nx=True, px=ttl):
                return None
            raw = await self._redis.get(key)
            if raw is None:  # released between the two calls: try once more
                if await self._redis.set(key, self._me_raw, nx=True, px=ttl):
                    return None
                raw = await self._redis.get(key)
            return Holder.decode(raw) if raw is not None else None
        return await self._guard("lease", take, None)

    async def lease_holder(self, key_id: str) -> Optional[Holder]:
        raw = await self._guard("lease", lambda: self._redis.get(NS + "lease:" + key_id), None)
        return Holder.decode(raw) if raw is not None else None

    async def renew_lease(self, key_id: str) -> bool:
        return bool(await self._guard("lease", lambda: self._renew(
            keys=[NS + "lease:" + key_id],
            args=[self._me_raw, int(self.cfg.lease_ttl * 1000)]), 1))

    async def break_lease(self, key_id: str, holder: Holder) -> None:
        await self._guard("lease", lambda: self._release(keys=[NS + "lease:" + key_id],
                                                         args=[holder.encode()]), 0)

    async def release_lease(self, key_id: str) -> None:
        await self._guard("lease", lambda: self._release(keys=[NS + "lease:" + key_id],
                                                         args=[self._me_raw]), 0)
