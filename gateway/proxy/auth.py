"""``Proxy-Authorization: Basic`` checking (RFC 9110 §11.7.1, RFC 7617)."""
from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections import OrderedDict
from typing import Callable, Iterable, Optional

Clock = Callable[[], float]


class ProxyAuth:
    """Checks the client's proxy credentials; off unless ``proxy.auth.enabled``.

    The expected credential is kept only as bytes for a constant-time comparison; nothing here
    logs or formats it.
    """

    def __init__(self, auth_settings, clock: Clock = time.monotonic) -> None:
        self.enabled = bool(auth_settings.enabled)
        self.failures = FailureLimiter(auth_settings.max_failures,
                                       float(auth_settings.failure_window),
                                       float(auth_settings.lockout), clock)
        self._expected = f"{auth_settings.username}:{auth_settings.password}".encode("utf-8")
        realm = auth_settings.realm.replace("\\", "\\\\").replace('"', '\\"')
        #: value of the Proxy-Authenticate header of a 407
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'

    def __repr__(self) -> str:
        return f"ProxyAuth(enabled={self.enabled})"

    def check(self, values: Iterable[str]) -> bool:
        """True when auth is off or one of the ``Proxy-Authorization`` values matches."""
        if not self.enabled:
            return True
        ok = False
        for value in values:
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "basic":
                continue
            try:
                given = base64.b64decode(token.strip(), validate=True)
            except (binascii.Error, ValueError):
                continue
            # compare every candidate, so timing does not depend on which one matched
            ok |= hmac.compare_digest(given, self._expected)
        return ok


class FailureLimiter:
    """Per client address: ``max_failures`` wrong credentials within ``window`` seconds lock the
    address out for ``lockout`` seconds (RFC 6585 429 with Retry-After), whatever it sends then.

    Why a lockout rather than a slower 407: a delayed answer still lets a client open many
    connections and guess in parallel; a locked-out address gets no verdict on any guess. The
    table is bounded (``max_addresses``, least recently failed dropped first), so a spray of
    addresses cannot grow it without limit.
    """

    def __init__(self, max_failures: int, window: float, lockout: float,
                 clock: Clock = time.monotonic, max_addresses: int = 10000) -> None:
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.clock = clock
        self.max_addresses = max_addresses
        #: address -> times of its recent failures (least recently failed first)
        self._failures: "OrderedDict[str, list[float]]" = OrderedDict()
        #: address -> end of its lockout
        self._locked: dict[str, float] = {}

    def locked_for(self, address: str) -> Optional[float]:
        """Seconds of lockout left for ``address``; None when it may try."""
        until = self._locked.get(address)
        if until is None:
            return None
        left = until - self.clock()
        if left > 0:
            return left
        del self._locked[address]
        return None

    def failed(self, address: str) -> Optional[float]:
        """Record one wrong credential; returns the lockout (seconds) when this one starts it."""
        if not self.max_failures:
            return None
        now = self.clock()
        times = self._failures.pop(address, [])
        times = [t for t in times if now - t < self.window]
        times.append(now)
        if len(times) >= self.max_failures:
            self._locked[address] = now + self.lockout
            if len(self._locked) > self.max_addresses:
                self._locked = {a: u for a, u in self._locked.items() if u > now}
                while len(self._locked) > self.max_addresses:
                    del self._locked[next(iter(self._locked))]
            return self.lockout
        self._failures[address] = times
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
        return None

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
