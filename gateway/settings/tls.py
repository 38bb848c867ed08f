"""The gateway's CA and the leaf certificates it mints for intercepted hosts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ._parse import ConfigError, Duration, secret


@dataclass(frozen=True)
class TLSSettings:
    #: operator-supplied CA (PEM); when both are unset a CA is created in data_dir/ca on first start
    ca_cert: Optional[str] = None
    ca_key: Optional[str] = None
    #: an encrypted ``ca_key``'s passphrase comes from this file or environment variable (never
    #: from the YAML itself)
    ca_key_password_file: Optional[str] = None
    ca_key_password_env: Optional[str] = None
    #: resolved at load time from the two above; never logged
    ca_key_password: str = field(default="", repr=False, metadata=secret(
        "use tls.ca_key_password_file or tls.ca_key_password_env"))
    #: common name of a generated CA
    ca_common_name: str = "trivy-gateway CA"
    #: validity of minted leaf certificates (short: they are re-minted on restart anyway)
    leaf_validity: Duration = Duration(7 * 86400)
    #: minted leaves kept in memory (LRU)
    leaf_cache_size: int = 256

    def validate(self, path: str) -> None:
        if bool(self.ca_cert) != bool(self.ca_key):
            raise ConfigError(path, "ca_cert and ca_key must be given together")
        if (self.ca_key_password_file or self.ca_key_password_env) and not self.ca_key:
            raise ConfigError(f"{path}.ca_key_password_file",
                              "a CA key password needs tls.ca_cert and tls.ca_key")
        if self.leaf_cache_size < 1:
            raise ConfigError(f"{path}.leaf_cache_size", "must be at least 1")
