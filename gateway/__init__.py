"""trivy-gateway: a forward proxy and caching gateway between Trivy and the internet."""

__version__ = "0.1.0"
