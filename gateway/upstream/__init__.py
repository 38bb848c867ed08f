"""Upstream client layer: pooled, verified, polite and resilient access to Trivy's upstreams."""
from .client import UpstreamClient
from .failover import Failover, equivalents
from .retry_after import parse_go_duration, parse_retry_after_body, parse_retry_after_header
from .types import Reason, UpstreamError, UpstreamRequest, UpstreamResponse

__all__ = ["UpstreamClient", "UpstreamRequest", "UpstreamResponse", "UpstreamError", "Reason",
           "Failover", "equivalents", "parse_retry_after_header", "parse_retry_after_body",
           "parse_go_duration"]
