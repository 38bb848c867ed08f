"""``Proxy-Authorization: Basic`` checking (RFC 9110 §11.7.1, RFC 7617)."""
from __future__ import annotations

import base64
import binascii
import hmac
from typing import Iterable


class ProxyAuth:
    """Checks the client's proxy credentials; off unless ``proxy.auth.enabled``.

    The expected credential is kept only as bytes for a constant-time comparison; nothing here
    logs or formats it.
    """

    def __init__(self, auth_settings) -> None:
        self.enabled = bool(auth_settings.enabled)
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
