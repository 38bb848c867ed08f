"""The allowlist: which targets are intercepted, tunnelled or denied, and the SSRF guard.

Pure decisions, no I/O: :meth:`Policy.decide` looks at a (host, port) a client asked for,
:meth:`Policy.address_allowed` at the address the upstream layer is about to connect to.
"""
from .rules import (ACTION_DENY, ACTION_INTERCEPT, ACTION_TUNNEL, REASON_CODES, Decision, Policy,
                    address_category, normalize_host)

__all__ = ["Policy", "Decision", "ACTION_INTERCEPT", "ACTION_TUNNEL", "ACTION_DENY",
           "REASON_CODES", "address_category", "normalize_host"]
