"""The admin port: /metrics, /healthz, /readyz, /ca.pem, /api/status and a small status page.

It runs on its own listener (``server.admin_listen``, default ``0.0.0.0:9128``) so the proxy port
never serves anything but proxy traffic. Everything shown comes from callables handed in by the
application (``status()``, ``ready()``, ``ca_pem()``); this package owns no state of its own.
"""
from __future__ import annotations

from .page import render_status_page
from .server import AdminServer

__all__ = ["AdminServer", "render_status_page"]
