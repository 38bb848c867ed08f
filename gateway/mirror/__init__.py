"""The mirror door: Trivy's artifacts as an OCI registry mirror, a Maven mirror and a VEX
repository, for scanners that do not trust the gateway's CA — one more front door onto the
same pipeline (cache, single flight, failover, stale serving) as the proxy."""
from .server import MirrorServer

__all__ = ["MirrorServer"]
