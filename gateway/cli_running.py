"""CLI commands that talk to the gateway running on this host: ``reload``, ``healthcheck``.

Both find it through the same configuration the gateway uses (admin address, data dir lock
file), so a YAML that moves the admin port or the data dir keeps them working.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

from .settings import Settings
from .cli_state import StateMissing, data_dir_hint


def admin_url(settings: Settings, path: str) -> str:
    """``path`` on the admin port of this host's gateway (a wildcard address means loopback)."""
    host, port = settings.server.admin_addr
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


def admin_status(settings: Settings) -> Optional[dict]:
    """/api/status of the local gateway (with the admin token when one is configured)."""
    import urllib.request  # noqa: PLC0415

    headers = ({"Authorization": f"Bearer {settings.server.admin_token}"}
               if settings.server.admin_token else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(admin_url(settings, "/api/status"),
                                                headers=headers), timeout=4) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def reload_command(settings: Settings) -> int:
    """Signal the gateway holding this data dir's lock, then wait (bounded) for its report."""
    import fcntl  # noqa: PLC0415
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from .startup import LOCK_FILE  # noqa: PLC0415

    lock = settings.data_dir / LOCK_FILE
    try:
        with open(lock, encoding="ascii") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                running = False                 # nobody holds it: no gateway
            except BlockingIOError:
                running = True
            pid = int(handle.read().strip() or 0)
    except (OSError, ValueError):
        running, pid = False, 0
    if not running or pid <= 0:
        raise StateMissing(f"no gateway is running on {lock.parent}: {data_dir_hint(settings)}")
    before = (admin_status(settings) or {}).get("config", {}).get("last_reload")
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        config = (admin_status(settings) or {}).get("config") or {}
        report = config.get("last_reload")
        if report and report != before:
            if report.get("result") != "applied":
                print("trivy-gateway: the gateway refused the new configuration (the running "
                      "one stays):\n  " + "\n  ".join(report.get("errors") or []), file=sys.stderr)
                return 2
            print(f"reloaded: config {config.get('digest')}; applied: "
                  f"{', '.join(report.get('applied') or []) or 'nothing changed'}", file=sys.stderr)
            if report.get("restart_needed"):
                print("needs a restart to take effect: " + ", ".join(report["restart_needed"]),
                      file=sys.stderr)
            return 0
        time.sleep(0.1)
    print(f"trivy-gateway: sent SIGHUP to pid {pid}; no report on its admin port within 10s "
          "(see its log: config_reloaded / config_reload_refused)", file=sys.stderr)
    return 1


def healthcheck_command(settings: Settings, args: argparse.Namespace) -> int:
    """GET the admin port's /healthz (or /readyz) on this host, from the effective config, so a
    YAML that moves the admin port does not break the container's HEALTHCHECK."""
    import urllib.request  # noqa: PLC0415

    url = admin_url(settings, "/readyz" if args.ready else "/healthz")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via *_proxy
    try:
        with opener.open(url, timeout=4) as response:
            response.read(1024)
    except OSError as exc:
        print(f"trivy-gateway: {url}: {getattr(exc, 'reason', None) or exc}", file=sys.stderr)
        return 1
    return 0
