"""The client-facing forward proxy: an asyncio Protocol + an HTTP/1.1 state machine over llhttp.

Why not aiohttp's web server (which the upstream side does use, as a client): a forward proxy must
answer ``CONNECT`` with ``200`` and then *own the raw connection*: start TLS on it as a server
with a certificate chosen for the CONNECT host (interception), or splice its bytes to an upstream
socket (tunnel). aiohttp's server has no supported way to take a connection over after a
response; its request parser also insists on origin-form/absolute-form semantics of a web
server. So the client side is built on:

* a buffered ``asyncio.Protocol`` per connection (:mod:`.stream`) with flow control both ways,
  and two schedulers (:mod:`.connection`): answers known at once — a fresh cache hit in memory
  — are written in the protocol callback; everything that awaits runs in a task that hands
  the connection back when it is idle (``docs/hit-path.md``);
* :mod:`.http1` — a small explicit HTTP/1.1 server state machine (h11-style events, no I/O)
  with llhttp (httptools) as the parser. It does the parsing and framing (Content-Length,
  chunked, keep-alive, HEAD/204/304, ``Expect: 100-continue``, the CONNECT switch, the request
  head limit) and enforces that a body matches its declared length, while leaving every byte of
  I/O to us. That is what makes the CONNECT takeover, ``loop.sendfile`` for cached files
  (:meth:`~.http1.ServerConnection.frame_region`) and streaming without buffering
  straightforward. (h11 did this job first; its pure-Python parsing was the largest single cost
  of a small cache hit.)
* ``loop.start_tls`` to upgrade an accepted connection to TLS in place with a minted leaf.

HTTP/2 is deliberately not offered to clients (ALPN ``http/1.1`` only): Trivy and curl fall back
to HTTP/1.1, and one request per stream keeps the proxy simple.
"""
from .auth import ProxyAuth
from .server import ProxyServer
from .tunnel import TunnelOpener, pipe

__all__ = ["ProxyServer", "ProxyAuth", "TunnelOpener", "pipe"]
