"""The status page's "Prefetch and freshness" section, rendered from a status dict shaped like
``Gateway.status()["lifecycle"]`` (values escaped, state badges, absent when nothing is watched).
The live gateway's ``/api/status`` is checked in tests/test_e2e_prefetch.py."""
from __future__ import annotations

from gateway.admin.page import render_status_page

NEW = "sha256:" + "b" * 64
OLD = "sha256:" + "a" * 64


def lifecycle(**db) -> dict:
    base = {"artifact": "vulnerability_db", "reference": "mirror.gcr.io/aquasec/trivy-db:2",
            "served_digest": OLD, "upstream_digest": OLD, "upstream_checked_ago_seconds": 42,
            "served_age_seconds": 7200, "updated_at": "2026-11-28T18:00:00Z",
            "behind_upstream": False, "consecutive_failures": 0, "last_error": None}
    return {"lifecycle": {"prefetch_enabled": True, "artifacts": [{**base, **db}]}}


def test_up_to_date_behind_and_failing():
    page = render_status_page(lifecycle())
    assert 'id="lifecycle-section"' in page and "Vulnerability DB" in page
    assert "up to date" in page and "2h 0m" in page and "42s ago" in page
    page = render_status_page(lifecycle(upstream_digest=NEW, behind_upstream=True))
    assert "fetching newer" in page
    page = render_status_page(lifecycle(consecutive_failures=3, behind_upstream=True,
                                        last_error="<script>x</script> upstream unavailable"))
    assert "failing (3)" in page
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page


def test_section_absent_without_prefetch():
    assert 'id="lifecycle-section"' not in render_status_page(
        {"lifecycle": {"prefetch_enabled": False, "artifacts": []}})
    assert 'id="lifecycle-section"' not in render_status_page({})
