"""TLS interception: the gateway CA (:mod:`.ca`) and per-host leaf certificates (:mod:`.leaf`)."""
from .ca import (CAError, CertificateAuthority, bundle_pem, export_pem, system_root_certificates)
from .leaf import LeafIssuer

__all__ = ["CertificateAuthority", "CAError", "LeafIssuer", "export_pem", "bundle_pem",
           "system_root_certificates"]
