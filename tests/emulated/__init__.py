"""Emulated upstream world for trivy-gateway tests (see README.md)."""

from .accesslog import AccessLog, LogEntry
from .artifacts import CUSTOM_CHECK_ID, ArtifactStore, write_config_project, write_maven_project
from .certs import EMULATED_HOSTS, TestPKI, create_pki
from .faults import Fault
from .tunnel_proxy import TunnelProxy, TunnelProxyThread
from .world import REPOSITORIES, World, WorldThread

__all__ = [
    "AccessLog",
    "ArtifactStore",
    "CUSTOM_CHECK_ID",
    "EMULATED_HOSTS",
    "Fault",
    "LogEntry",
    "REPOSITORIES",
    "TestPKI",
    "TunnelProxy",
    "TunnelProxyThread",
    "World",
    "WorldThread",
    "create_pki",
    "write_config_project",
    "write_maven_project",
]
