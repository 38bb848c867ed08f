"""The lifecycle of the artifacts Trivy needs: air-gap bundles, prefetch, freshness.

- :mod:`.bundle` / :mod:`.bundle_import`: ``trivy-gateway bundle export|import`` (one tar with a
  manifest of digests; verified completely before anything is published).
- :mod:`.prefetch`: a background task that watches the artifacts' tags and fetches a new
  generation through the same pipeline clients use, before any client asks.
- :mod:`.freshness`: what is served versus what upstream has, for metrics and ``/api/status``.
"""
