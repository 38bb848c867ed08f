"""Every client-error reason the front doors count is in CLIENT_ERROR_REASONS, so it is exported
at 0 from the start (increase() sees its first occurrence; the dashboard and alerts rely on it)."""
from __future__ import annotations

import re
from pathlib import Path

from gateway.observability.metrics import CLIENT_ERROR_REASONS

DOORS = Path(__file__).resolve().parent.parent / "gateway"
_USE = re.compile(r'(?:client_error|client_errors\.labels\(reason)\s*=\s*"([a-z_]+)"')


def test_every_counted_client_error_reason_is_declared():
    used = set()
    for package in ("proxy", "mirror"):
        for path in (DOORS / package).glob("*.py"):
            used |= set(_USE.findall(path.read_text("utf-8")))
    assert used, "the pattern found no use: update the test with the code"
    assert used <= set(CLIENT_ERROR_REASONS), sorted(used - set(CLIENT_ERROR_REASONS))
