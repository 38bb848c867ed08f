"""``server.workers: N``: N processes on one machine serving the same ports as one cache.

Each worker is a replica in the sense of docs/scale-out.md — the same mechanisms, nothing
specific to one machine: the proxy and mirror listeners are opened with ``SO_REUSEPORT`` (the
kernel spreads connections over the workers), single flight, circuits and the upstream budget
are shared through Redis (``cache.shared.redis_url`` is required), a fill in progress in one
worker is streamed by the others from its peer endpoint on loopback, and a body one worker has
is read by the others from its local tier (or from S3 when configured) instead of the upstream.

What differs per worker (derived here, never written by the operator):

- its local tier ``<data_dir>/workers/<i>`` with ``cache.max_size / N`` (disk stays bounded by
  ``cache.max_size``; a hot body may be held by several workers);
- its admin port ``admin_listen + i`` (every worker is scraped and probed on its own);
- its peer endpoint ``peer_listen + i`` (``127.0.0.1:0`` when unset: an ephemeral port);
- the CA: created once by the supervisor in ``<data_dir>/ca`` and used by every worker, so a
  client that trusts the gateway trusts every worker.

The supervisor (this process) serves nothing: it holds the lock on ``server.data_dir``
(gateway.startup: no second gateway on the same data dir; ``trivy-gateway reload`` finds the
supervisor's pid there), checks every worker's ports, forks the workers before any event loop
or thread exists, restarts one that dies (at most once per :data:`RESTART_DELAY`), forwards
SIGTERM/SIGINT/SIGHUP and exits when all have drained. Each worker locks its own data dir
``<data_dir>/workers/<i>`` like a single gateway, and re-derives its settings on a reload.

Why processes and not threads: one event loop per core is what makes every core serve; why
per-worker local tiers and not one shared blob index: the blob store's index and LRU live in
one process, and sharing them between processes would be a second mechanism for what the
replica design already guarantees.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Callable

from .observability.logging import get_logger
from .settings import Settings

log = get_logger("gateway.workers")

#: a worker that died is started again after at least this many seconds
RESTART_DELAY = 1.0


def _shift_port(hostport: str, i: int) -> str:
    host, _, port = hostport.rpartition(":")
    return f"{host}:{int(port) + i}" if port.isdigit() and int(port) else hostport


def worker_settings(settings: Settings, i: int, n: int) -> Settings:
    """The settings of worker ``i`` of ``n`` (see the module docstring)."""
    from .tls.ca import CA_CERT_FILE, CA_KEY_FILE  # noqa: PLC0415

    server = dataclasses.replace(
        settings.server, workers="1", reuse_port=True,
        data_dir=str(settings.data_dir / "workers" / str(i)),
        admin_listen=_shift_port(settings.server.admin_listen, i))
    tls = settings.tls
    if not tls.ca_cert:
        ca_dir = settings.data_dir / "ca"
        tls = dataclasses.replace(tls, ca_cert=str(ca_dir / CA_CERT_FILE),
                                  ca_key=str(ca_dir / CA_KEY_FILE))
    shared = settings.cache.shared
    shared = dataclasses.replace(
        shared, peer_listen=_shift_port(shared.peer_listen, i) if shared.peer_listen
        else "127.0.0.1:0",
        peer_advertise=_shift_port(shared.peer_advertise, i) if shared.peer_advertise else "")
    cache = dataclasses.replace(settings.cache, shared=shared,
                                max_size=type(settings.cache.max_size)(settings.cache.max_size // n))
    return dataclasses.replace(settings, server=server, tls=tls, cache=cache)


Serve = Callable[[Settings, Callable[[], Settings]], int]


def run_workers(settings: Settings, loader: Callable[[], Settings], serve: Serve) -> int:
    """Supervise ``server.worker_count`` workers, each running ``serve(its settings, its
    loader)``; ``loader`` re-reads the whole configuration (live reload)."""
    from .startup import (DataDirLock, StartupError, ca_error, check_addresses,  # noqa: PLC0415
                          check_files, data_dir_error)
    from .tls.ca import CAError, CertificateAuthority  # noqa: PLC0415

    n = settings.server.worker_count
    check_files(settings)          # ConfigErrors (exit 2) before the data dir exists
    lock = DataDirLock(settings)   # inherited by the workers: held while any of them runs
    try:
        lock.acquire()
        for i in range(n):         # a taken port fails here once, not in a restart loop
            check_addresses(worker_settings(settings, i, n))
        try:
            CertificateAuthority.load_or_create(settings)  # once, before the workers read it
        except OSError as exc:
            raise data_dir_error(settings, exc) from None
        except CAError as exc:
            raise ca_error(settings, exc) from None
    except (OSError, StartupError) as exc:
        lock.release()
        print(f"trivy-gateway: cannot start: {exc}", file=sys.stderr)
        return 1
    children: dict[int, int] = {}
    stopping = False

    def start(i: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            # a reload forwarded before the gateway's own SIGHUP handler exists is a no-op,
            # not the default (which would end the worker)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            code = 1
            try:
                code = serve(worker_settings(settings, i, n),
                             lambda: worker_settings(loader(), i, n))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = i
        log.info("worker_started", worker=i, pid=pid, workers=n)

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP   # SIGHUP: every worker reloads
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for i in range(n):
        start(i)
    last_restart = 0.0
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        i = children.pop(pid, None)
        if i is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            worst = max(worst, code if code > 0 else 0)
            continue
        log.error("worker_exited", worker=i, pid=pid, exit_code=code,
                  effect="started again; its clients were cut, other workers serve on")
        wait = last_restart + RESTART_DELAY - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        last_restart = time.monotonic()
        start(i)
    log.info("workers_stopped", workers=n)
    lock.release()
    return worst
