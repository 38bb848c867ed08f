"""The proxy listener: accepts client connections and owns their lifecycle (drain, close)."""
from __future__ import annotations

import asyncio
import ssl
from typing import Callable, Optional

from ..exchange import Exchange, Response
from ..observability.logging import get_logger
from ..settings import split_hostport
from .auth import ProxyAuth
from .connection import ClientConnection
from .memory import MemoryReleaser
from .shapes import ShapeBudget, ShapeMemo
from .stream import ClientStream
from .tunnel import TunnelOpener

#: CONNECT authorities with a shape memo before the memos start over (Trivy talks to a handful)
SHAPE_AUTHORITIES = 256

log = get_logger("gateway.proxy")


class ProxyServer:
    """``ProxyServer(settings, policy, leaf_issuer, handler, metrics, open_tunnel)``.

    * ``settings``: the whole :class:`~gateway.settings.Settings` (``server.listen``, ``proxy``,
      ``upstream.connect_timeout``, ``logging.access_log`` are read);
    * ``policy``: :class:`~gateway.policy.Policy`; ``leaf_issuer``: :class:`~gateway.tls.LeafIssuer`;
    * ``handler``: anything with ``async handle(Exchange) -> Response``, and optionally
      ``try_hit(Exchange) -> Optional[Response]`` (answers known without awaiting: asked first
      for bodyless requests; None → ``handle``);
    * ``open_tunnel``: ``async (host, port) -> (StreamReader, StreamWriter)`` for tunnel rules.

    ``listen`` overrides ``settings.server.listen`` (``"127.0.0.1:0"`` picks a free port;
    :attr:`address` tells which).
    """

    #: the door's connection type and name (the mirror listener reuses this server with its
    #: own request dispatch, see gateway/mirror/server.py)
    connection_class = ClientConnection
    door_name = "proxy"
    #: TLS on the listening socket itself (the mirror door with the operator's certificate)
    ssl_context: Optional[ssl.SSLContext] = None

    def __init__(self, settings, policy, leaf_issuer, handler, metrics,
                 open_tunnel: Optional[TunnelOpener] = None, *, listen: Optional[str] = None) -> None:
        self.settings = settings
        self.policy = policy
        self.leaf_issuer = leaf_issuer
        self.handler = handler
        #: the handler's synchronous answer for bodyless requests, when it has one
        self.try_hit: Optional[Callable[[Exchange], Optional[Response]]] = getattr(
            handler, "try_hit", None)
        self.metrics = metrics
        self.open_tunnel = open_tunnel or _no_tunnel
        self.auth = ProxyAuth(settings.proxy.auth)
        self.draining = False
        self._listen = listen or settings.server.listen
        self._server: Optional[asyncio.AbstractServer] = None
        #: open client connections (each unregisters itself when over: connection_done)
        self._connections: set[ClientConnection] = set()
        #: open connections per client address (proxy.max_connections_per_client)
        self._per_address: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_refusal_log = -1e9
        self.memory = MemoryReleaser()
        metrics.add_known_hosts(policy.hosts)
        #: prometheus children by label values (``labels()`` costs a lock and a tuple build on
        #: every call); bounded, the label values are
        self.metric_children: dict[tuple, object] = {}
        #: request shapes per CONNECT authority (``shapes.py``), bounded together
        self._shapes: dict[tuple[str, int], ShapeMemo] = {}
        self._shape_budget = ShapeBudget()

    def shapes_for(self, host: str, port: int, settings: object) -> ShapeMemo:
        """The shape memo of intercepted connections to ``host:port`` created under
        ``settings`` (a connection's proxy settings: another object after a reload)."""
        key = (host, port)
        memo = self._shapes.get(key)
        if memo is None or memo.settings is not settings:
            if memo is not None:
                self._shape_budget.retire(memo)
            if len(self._shapes) >= SHAPE_AUTHORITIES:
                for old in self._shapes.values():
                    self._shape_budget.retire(old)
                self._shapes.clear()
            memo = self._shapes[key] = self._shape_budget.memo(settings)
        return memo

    # -- introspection --------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound (the first socket when several)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the proxy server is not listening")
        return self._server.sockets[0].getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    @property
    def busy_connections(self) -> int:
        return sum(1 for c in self._connections if c.busy)

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        cap = self.settings.proxy.max_connections
        if cap:
            # a tunnel holds two descriptors; leave room for upstream pools, cache files, logs
            needed = 2 * cap + 256
            soft, _hard = raise_open_file_limit(needed)
            if 0 <= soft < needed:
                log.warning("open_file_limit_low", soft_limit=soft, needed=needed,
                            max_connections=cap,
                            hint="raise the container/systemd nofile limit (LimitNOFILE=) or "
                                 "lower proxy.max_connections")
        # the settings' reading of the address (":3128" is 0.0.0.0:3128), the one the start-up
        # probe (startup.check_addresses) checked; not None, which would bind IPv6 as well
        host, port = split_hostport(self._listen, f"{self.door_name} listen address")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientStream(self._accepted), host, port, reuse_address=True,
            backlog=512, ssl=self.ssl_context, reuse_port=self.settings.server.reuse_port or None)
        log.info(f"{self.door_name}_listening", address=f"{self.address[0]}:{self.address[1]}",
                 auth=self.auth.enabled, tls=self.ssl_context is not None)

    def stop_accepting(self) -> None:
        """Close the listening socket(s); established connections carry on."""
        if self._server is not None and self._server.is_serving():
            self._server.close()
            log.info(f"{self.door_name}_stopped_accepting", connections=len(self._connections))

    async def drain(self, grace: float) -> bool:
        """Finish in-flight requests within ``grace`` seconds; idle connections close at once.

        Responses sent while draining carry ``Connection: close``. Whatever is still running
        when the grace period ends is aborted. Returns True when everything finished in time.
        """
        self.stop_accepting()
        self.draining = True
        for conn in list(self._connections):
            conn.close_if_idle()
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
            return True
        except TimeoutError:
            log.warning("proxy_drain_timeout", aborted=len(self._connections), grace=grace)
            await self._abort_all()
            return False

    async def close(self) -> None:
        """Stop accepting and abort every connection (no grace)."""
        self.stop_accepting()
        self.draining = True
        self.memory.cancel()
        await self._abort_all()
        if self._server is not None:
            self._server.close()
            try:
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
            except TimeoutError:
                pass

    async def _abort_all(self) -> None:
        tasks = []
        for conn in list(self._connections):
            task = conn.abort()
            if task is not None:
                tasks.append(task)
        if tasks:
            try:
                async with asyncio.timeout(5):
                    await asyncio.gather(*tasks, return_exceptions=True)
            except TimeoutError:
                log.warning("proxy_connections_not_closed", count=len(self._connections))
        if self._connections:
            # aborted transports report their loss on the next loop iterations
            try:
                async with asyncio.timeout(5):
                    await self._idle.wait()
            except TimeoutError:
                log.warning("proxy_connections_not_closed", count=len(self._connections))

    def _accepted(self, stream: ClientStream) -> None:
        """A new client socket (the stream's first ``connection_made``): refuse it over the
        connection limits, else create its connection and start serving it."""
        proxy = self.settings.proxy
        cap = proxy.max_connections
        if cap and len(self._connections) >= cap:
            self._refuse(stream, "too_many_connections", 503,
                         b"Service Unavailable: too many connections",
                         f"too many client connections (proxy.max_connections = {cap})")
            return
        peer = stream.get_extra_info("peername")
        address = peer[0] if peer else "?"
        per_client = proxy.max_connections_per_client
        if per_client and self._per_address.get(address, 0) >= per_client:
            self._refuse(stream, "too_many_connections_per_client", 429,
                         b"Too Many Requests: too many connections from this address",
                         f"too many connections from {address} "
                         f"(proxy.max_connections_per_client = {per_client})")
            return
        conn = self.connection_class(self, stream)
        self._connections.add(conn)
        self._per_address[address] = self._per_address.get(address, 0) + 1
        self._idle.clear()
        conn.start()
        if self.draining:
            conn.abort()

    def connection_done(self, conn: ClientConnection) -> None:
        """Called once by a connection when it is over."""
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        address = conn.client_ip
        left = self._per_address.pop(address, 1) - 1
        if left > 0:
            self._per_address[address] = left
        self.memory.connection_closed()
        if not self._connections:
            self._idle.set()

    def _refuse(self, stream: ClientStream, reason: str, status: int, status_text: bytes,
                message: str) -> None:
        """Over ``proxy.max_connections`` (503) or ``proxy.max_connections_per_client`` (429):
        a short answer with Retry-After, then close (clients retry; better than the whole
        process running out of file descriptors, or one client taking every slot). The
        client's request is read and dropped for up to a second before closing: closing with
        it unread would reset the connection and the client might never see the answer."""
        self.metrics.client_errors.labels(reason=reason).inc()
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._last_refusal_log >= 10.0:  # a flood must not flood the log too
            self._last_refusal_log = now
            log.warning("proxy_connection_refused", reason=message)
        body = f"trivy-gateway: {message}; retry shortly\n".encode()
        transport = stream.transport
        assert transport is not None
        transport.write(b"HTTP/1.1 %d %s\r\n"
                        b"Content-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                        % (status, status_text, len(body), body))
        if transport.can_write_eof():
            transport.write_eof()
        dropped = [0]

        def drop(data: bytes) -> None:
            dropped[0] += len(data)
            if not data or dropped[0] >= 64 * 1024:
                transport.close()

        stream.on_data = drop
        timer = loop.call_later(1.0, transport.close)
        stream.on_lost = lambda exc: timer.cancel()


def raise_open_file_limit(wanted: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never above the hard limit); returns
    (soft, hard) after. Default soft limits (1024) are below what a busy proxy needs."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


async def _no_tunnel(host: str, port: int):
    from ..upstream.types import UpstreamError
    raise UpstreamError("connect", host, "tunnelling is not available in this gateway")
