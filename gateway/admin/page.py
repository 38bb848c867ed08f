"""Server-rendered HTML status page (``GET /`` on the admin port).

Pure function of the ``status()`` dict: no I/O, no JavaScript. Every value that comes from the
status dict is passed through :func:`html.escape` at the point it is written (hosts, references,
errors and even numbers, since the dict is produced elsewhere and may carry anything). Missing or
malformed keys render as an em dash instead of failing the page.
"""
from __future__ import annotations

import html
import math
import time
from functools import lru_cache
from importlib import resources
from string import Template
from typing import Any, Mapping, Optional

ARTIFACT_TITLES = {
    "vulnerability_db": "Vulnerability DB",
    "java_db": "Java DB",
    "checks_bundle": "Checks bundle",
    "vex_hub": "VEX Hub",
}
CIRCUIT_TEXT = {"closed": "closed", "half_open": "half-open", "open": "open"}
DASH = "\u2014"


@lru_cache(maxsize=1)
def _template() -> Template:
    return Template(resources.files("gateway.admin").joinpath("status.html").read_text("utf-8"))


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> Optional[float]:
    """A finite float, or None for anything else (None, strings, NaN, bools)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def human_bytes(value: Any) -> str:
    n = _num(value)
    if n is None:
        return DASH
    sign, n = ("-" if n < 0 else ""), abs(n)
    if n < 1024:
        return f"{sign}{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{sign}{n:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def human_duration(value: Any) -> str:
    n = _num(value)
    if n is None:
        return DASH
    if n < 0:
        return "0s"
    s = int(n)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def percent(value: Any) -> str:
    n = _num(value)
    return DASH if n is None else f"{n * 100:.1f}%"


def short_digest(digest: Any) -> str:
    """``sha256:8cf26c7b1f2e…`` (algorithm + 12 hex digits)."""
    text = str(digest)
    algo, sep, hexpart = text.partition(":")
    if sep and len(hexpart) > 12:
        return f"{algo}:{hexpart[:12]}\u2026"
    return text if len(text) <= 24 else text[:23] + "\u2026"


def _val(value: Any) -> str:
    """Escaped text of a plain value; None becomes an em dash."""
    return esc(DASH if value is None else value)


def _mapping(value: Any) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def _badge(text: str, cls: str, elem_id: str = "") -> str:
    id_attr = f' id="{esc(elem_id)}"' if elem_id else ""
    return f'<span class="badge {esc(cls)}"{id_attr}>{esc(text)}</span>'


def _ready_badge(status: Mapping) -> str:
    if status.get("draining") is True:
        return _badge("draining", "state-warn")
    ready = status.get("ready")
    if ready is True:
        return _badge("ready", "state-ok")
    if ready is False:
        return _badge("not ready", "state-bad")
    return _badge("readiness unknown", "state-warn")


def _health_badge(status: Mapping) -> str:
    state = _mapping(status.get("health")).get("state")
    if state == "ok":
        return _badge("upstreams ok", "state-ok", "health-state")
    if state == "degraded":
        return _badge("degraded", "state-bad", "health-state")
    return ""


def _health(status: Mapping) -> str:
    """Why the gateway is degraded, first on the page: the answer to "is it working?"."""
    health = _mapping(status.get("health"))
    reasons = health.get("reasons")
    reasons = reasons if isinstance(reasons, list) else []
    note = ('<p class="muted">"ready" means the gateway accepts connections (what /readyz '
            "answers); it stays ready while upstreams fail, serving what it has cached.</p>")
    if health.get("state") != "degraded" or not reasons:
        return ""
    items = "\n".join(f"<li>{esc(r)}</li>" for r in reasons)
    return (f'<section id="health-section" class="degraded"><h2>Degraded</h2>'
            f'<ul id="health-reasons">\n{items}\n</ul>{note}</section>')


def _next_check(value: Any) -> str:
    n = _num(value)
    if n is None:
        return DASH
    return "due" if n <= 0 else "in " + human_duration(n)


def _ago(value: Any) -> str:
    return esc(human_duration(value)) + " ago"


def _list_section(items: Any, *, section_id: str, title: str, table_id: str, row_class: str,
                  headers: str, cells: Any) -> str:
    """A table of status list items (one row per mapping), or nothing when the list is empty:
    problems appear on the page only while there are some."""
    rows = []
    for item in items if isinstance(items, list) else []:
        item = _mapping(item)
        rows.append(f'<tr class="{row_class}" data-host="{esc(item.get("host") or "")}">'
                    + "".join(cells(item)) + "</tr>")
    if not rows:
        return ""
    return (f'<section id="{section_id}"><h2>{esc(title)}</h2><table id="{table_id}"><thead><tr>'
            f"{headers}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table></section>")


def _denied(status: Mapping) -> str:
    return _list_section(
        status.get("denied"), section_id="denied-section", title="Recently refused by policy",
        table_id="denied", row_class="denied",
        headers=('<th>Target</th><th class="num">Count</th><th class="num">Last</th>'
                 "<th>Reason</th><th>To allow it</th>"),
        cells=lambda item: [
            _cell(f"<code>{esc(item.get('host') or DASH)}:{esc(item.get('port') or DASH)}</code>"),
            _cell(_val(item.get("count")), "num"),
            _cell(_ago(item.get("seconds_ago")), "num"),
            _cell(esc(item.get("reason") or DASH)),
            _cell(f"<code>{esc(item.get('allow') or DASH)}</code>", "allow")])


def _errors(status: Mapping) -> str:
    return _list_section(
        status.get("recent_errors"), section_id="errors-section", title="Recent upstream errors",
        table_id="recent-errors", row_class="recent-error",
        headers=('<th>Host</th><th class="num">Failures in a row</th><th class="num">Last</th>'
                 "<th>Error</th>"),
        cells=lambda item: [
            _cell(f"<code>{esc(item.get('host') or DASH)}</code>"),
            _cell(_val(item.get("consecutive_failures")), "num"),
            _cell(_ago(item.get("seconds_ago")), "num"),
            _cell(esc(item.get("error") or DASH), "error")])


def _cell(text: str, cls: str = "", title: str = "") -> str:
    attrs = (f' class="{esc(cls)}"' if cls else "") + (f' title="{esc(title)}"' if title else "")
    return f"<td{attrs}>{text}</td>"


def _counts(results: Mapping) -> str:
    """``hit 14 · miss 1 · …`` (escaped)."""
    return " · ".join(f"{esc(k)} {esc(int(v) if _num(v) is not None else v)}"
                      for k, v in results.items())


def _summary(status: Mapping) -> str:
    results = _mapping(status.get("cache_results"))
    served = _mapping(status.get("bytes_served"))
    from_cache, from_upstream = _num(served.get("cache")), _num(served.get("upstream"))
    total = (from_cache or 0) + (from_upstream or 0)
    share = percent(from_cache / total) if from_cache is not None and total > 0 else DASH
    ratio = status.get("hit_ratio")
    counts = _counts(results) or "no client requests yet"
    prefetch = _counts(_mapping(status.get("prefetch_cache_results")))
    prefetch_line = (f'\n    <div class="muted" id="prefetch-results">prefetch, not counted: '
                     f'{prefetch}</div>' if prefetch else "")
    return f"""<section id="traffic">
<h2>Cache effectiveness</h2>
<div class="cards">
  <div class="card"><div class="label">Hit ratio</div>
    <div class="value" id="hit-ratio">{esc(percent(ratio))}</div>
    <div class="muted">clients: {counts}</div>{prefetch_line}</div>
  <div class="card"><div class="label">Served from cache</div>
    <div class="value" id="bytes-cache">{esc(human_bytes(from_cache))}</div>
    <div class="muted">{esc(share)} of all bytes served</div></div>
  <div class="card"><div class="label">Fetched from upstream</div>
    <div class="value" id="bytes-upstream">{esc(human_bytes(from_upstream))}</div>
    <div class="muted">bytes the upstreams had to send</div></div>
</div>
</section>"""


def _artifact_title(item: Mapping) -> tuple[Any, str]:
    name = item.get("artifact")
    return name, ARTIFACT_TITLES.get(name, name) if isinstance(name, str) else DASH


def _digest_cell(digest: Any, cls: str, note: str = "") -> str:
    if not digest:
        return _cell(DASH, cls)
    return _cell(f"<code>{esc(short_digest(digest))}</code>{esc(note)}", cls, str(digest))


def _artifacts(status: Mapping) -> str:
    items = status.get("artifacts")
    rows = []
    for item in items if isinstance(items, list) else []:
        item = _mapping(item)
        name, title = _artifact_title(item)
        digest_cell = _digest_cell(item.get("digest"), "digest")
        stale = item.get("stale")
        if stale is True:
            marker = _badge("stale", "state-warn")
        elif stale is False:
            marker = _badge("fresh", "state-ok")
        else:
            marker = DASH
        age_title = ""
        fetched = _num(item.get("fetched_at"))
        if fetched is not None:
            age_title = "fetched " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(fetched))
        rows.append(
            f'<tr class="artifact" data-artifact="{esc(name if name is not None else "")}">'
            + _cell(esc(title))
            + _cell(f"<code>{esc(item.get('reference') or DASH)}</code>", "reference")
            + digest_cell
            + _cell(esc(human_bytes(item.get("size"))), "num size")
            + _cell(esc(human_duration(item.get("age_seconds"))), "num age", age_title)
            + _cell(esc(_next_check(item.get("next_check_seconds"))), "num next-check",
                    "after this, the next request for it refreshes the tag in the background")
            + _cell(marker, "stale")
            + "</tr>")
    if not rows:
        body = ('<p class="muted" id="no-artifacts">No Trivy artifact has been cached yet. '
                "The first scan through the gateway fills the cache.</p>")
    else:
        body = ('<table id="artifacts"><thead><tr><th>Artifact</th><th>Reference</th>'
                '<th>Digest</th><th class="num">Size</th><th class="num">Age</th>'
                '<th class="num">Next check</th><th>State</th></tr></thead><tbody>\n'
                + "\n".join(rows) + "\n</tbody></table>")
    return f'<section id="artifacts-section">\n<h2>Cached Trivy artifacts</h2>\n{body}\n</section>'


def _lifecycle(status: Mapping) -> str:
    """Prefetch and freshness per watched artifact (``status["lifecycle"]``)."""
    lc = _mapping(status.get("lifecycle"))
    items = lc.get("artifacts")
    rows = []
    for item in items if isinstance(items, list) else []:
        item = _mapping(item)
        name, title = _artifact_title(item)
        failures = _num(item.get("consecutive_failures")) or 0
        if failures:
            state = _badge(f"failing ({int(failures)})", "state-bad")
        elif item.get("behind_upstream") is True:
            state = _badge("fetching newer", "state-warn")
        elif item.get("served_digest"):
            state = _badge("up to date", "state-ok")
        else:
            state = DASH
        checked = _num(item.get("upstream_checked_ago_seconds"))
        rows.append(
            f'<tr class="lifecycle" data-artifact="{esc(name if name is not None else "")}">'
            + _cell(esc(title))
            + _digest_cell(item.get("served_digest"), "served")
            + _cell(esc(human_duration(item.get("served_age_seconds"))), "num age",
                    f"updated at {item.get('updated_at')}" if item.get("updated_at") else "")
            + _digest_cell(item.get("upstream_digest"), "upstream",
                           f" ({human_duration(checked)} ago)" if checked is not None else "")
            + _cell(state, "state")
            + _cell(esc(item.get("last_error") or ""), "error")
            + "</tr>")
    if not rows:
        return ""
    return ('<section id="lifecycle-section">\n<h2>Prefetch and freshness</h2>\n'
            '<table id="lifecycle"><thead><tr><th>Artifact</th><th>Served</th>'
            '<th class="num">Age</th><th>Upstream (checked)</th><th>State</th>'
            "<th>Last error</th></tr></thead><tbody>\n" + "\n".join(rows)
            + "\n</tbody></table>\n</section>")


def _upstreams(status: Mapping) -> str:
    ups = _mapping(status.get("upstreams"))
    rows = []
    for host in sorted(ups, key=str):
        info = _mapping(ups[host])
        state = info.get("circuit")
        state_key = state if state in CIRCUIT_TEXT else "unknown"
        state_text = CIRCUIT_TEXT.get(state, str(state) if state is not None else "unknown")
        remaining = _num(info.get("open_remaining"))
        remaining_text = (f"{remaining:.0f}s" if remaining is not None and remaining > 0
                          else DASH)
        rate = _num(info.get("rate"))
        last_error = info.get("last_error")
        last_status = info.get("last_status")

        rows.append(
            f'<tr class="upstream" data-host="{esc(host)}">'
            + _cell(f"<code>{esc(host)}</code>", "host")
            + _cell(f'<span class="badge circuit circuit-{esc(state_key)}">{esc(state_text)}</span>',
                    "circuit-cell")
            + _cell(esc(remaining_text), "num open-remaining")
            + _cell(esc(DASH if rate is None else f"{rate:g}/s"), "num rate")
            + _cell(_val(info.get("queue_depth")), "num queue")
            + _cell(_val(info.get("in_flight")), "num in-flight")
            + _cell(_val(info.get("requests")), "num requests")
            + _cell(_val(last_status), "num last-status")
            + _cell(esc(last_error) if last_error else DASH, "last-error error" if last_error else "last-error")
            + "</tr>")
    waiting = status.get("upstreams_not_contacted")
    for host in waiting if isinstance(waiting, list) else []:
        rows.append(f'<tr class="upstream not-contacted" data-host="{esc(host)}">'
                    + _cell(f"<code>{esc(host)}</code>", "host")
                    + _cell('<span class="badge circuit circuit-unknown">not contacted yet</span>',
                            "circuit-cell")
                    + "".join(_cell(DASH) for _ in range(7)) + "</tr>")
    if not rows:
        body = '<p class="muted" id="no-upstreams">No upstream has been contacted yet.</p>'
    else:
        body = ('<table id="upstreams"><thead><tr><th>Host</th><th>Circuit</th>'
                '<th class="num" title="time left until an open circuit lets one probe request '
                'through">Next try in</th><th class="num">Rate</th><th class="num">Queue</th>'
                '<th class="num">In flight</th><th class="num">Requests</th>'
                '<th class="num">Last status</th><th>Last error</th></tr></thead><tbody>\n'
                + "\n".join(rows) + "\n</tbody></table>")
    return f'<section id="upstreams-section">\n<h2>Upstream health</h2>\n{body}\n</section>'


def _cache(status: Mapping) -> str:
    cache = _mapping(status.get("cache"))
    used, budget = _num(cache.get("size_bytes")), _num(cache.get("max_size_bytes"))
    if used is not None and budget:
        frac = max(0.0, min(used / budget, 1.0))
        level = "bad" if frac >= 0.9 else "warn" if frac >= 0.75 else ""
        bar = (f'<div class="bar {level}" title="{esc(percent(used / budget))} of the budget">'
               f'<div style="width: {frac * 100:.1f}%"></div></div>')
        usage = f"{esc(human_bytes(used))} of {esc(human_bytes(budget))} ({esc(percent(used / budget))})"
    else:
        bar = ""
        usage = f"{esc(human_bytes(used))} of {esc(human_bytes(budget))}"
    return f"""<section id="cache-section">
<h2>Cache disk</h2>
<div id="cache-usage">{usage}</div>
{bar}
<dl>
  <dt>Blobs</dt><dd>{_val(cache.get("blobs"))}</dd>
  <dt>Entries</dt><dd>{_val(cache.get("entries"))}</dd>
  <dt>Free on disk</dt><dd>{esc(human_bytes(cache.get("disk_free_bytes")))}</dd>
</dl>
</section>"""


def _doors(status: Mapping) -> str:
    """Both front doors: the proxy (clients trust the CA) and the mirror (they do not)."""
    doors = _mapping(status.get("doors"))
    rows = []
    for name, what in (("proxy", "HTTPS_PROXY clients (trust the gateway CA)"),
                       ("mirror", "registry / Maven / VEX mirror clients (no CA)")):
        door = _mapping(doors.get(name))
        listen = door.get("listen")
        where = (("https://" if door.get("tls") else "http://") + str(listen)) if listen else "off"
        rows.append(f'<tr id="door-{name}"><td>{esc(name)}</td><td>{esc(what)}</td>'
                    f'<td class="mono">{esc(where)}</td><td>{_val(door.get("connections"))}</td></tr>')
    return f"""<section id="doors-section">
<h2>Front doors</h2>
<table><thead><tr><th>Door</th><th>For</th><th>Listening</th><th>Connections</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
</section>"""


def _fleet(status: Mapping) -> str:
    """Replicas acting as one cache (cache.shared): each live replica's fills by source."""
    fleet = _mapping(status.get("fleet"))
    me = fleet.get("replica")
    rows = []
    for r in fleet.get("replicas") or []:
        r = _mapping(r)
        fills = _mapping(r.get("fills"))
        moved = _mapping(r.get("s3_bytes"))
        here = " (this one)" if r.get("replica") == me else ""
        rows.append(
            f'<tr class="replica"><td class="mono">{esc(r.get("replica"))}{esc(here)}</td>'
            f'<td class="mono">{esc(r.get("peer") or DASH)}</td>'
            + "".join(f"<td>{_val(fills.get(k))}</td>" for k in ("led", "followed", "s3",
                                                                 "peer", "takeover"))
            + f'<td>{esc(human_bytes(moved.get("upload")))} / '
              f'{esc(human_bytes(moved.get("download")))}</td></tr>')

    def up(value: Any) -> str:
        return "not configured" if value is None else "up" if value else "DOWN (working alone)"
    return f"""<section id="fleet-section">
<h2>Fleet</h2>
<dl>
  <dt>Redis</dt><dd id="fleet-redis">{esc(up(fleet.get("redis_up")))}</dd>
  <dt>S3</dt><dd id="fleet-s3">{esc(up(fleet.get("s3_up")))}</dd>
</dl>
<table><thead><tr><th>Replica</th><th>Peer</th><th>Fills led</th><th>Followed from a peer</th>
<th>From S3</th><th>From a peer's disk</th><th>Taken over</th><th>S3 up / down</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
</section>"""


def _ca(status: Mapping) -> str:
    ca = _mapping(status.get("ca"))
    return f"""<section id="ca-section">
<h2>Gateway CA</h2>
<p>Clients must trust this certificate to use the gateway for HTTPS
(<code>SSL_CERT_FILE</code>, <code>trivy --cacert</code>):
<a class="download" id="ca-link" href="/ca.pem" download="trivy-gateway-ca.pem">Download CA certificate (ca.pem)</a></p>
<dl>
  <dt>Subject</dt><dd>{esc(ca.get("subject") or DASH)}</dd>
  <dt>SHA-256 fingerprint</dt><dd class="mono" id="ca-fingerprint">{esc(ca.get("fingerprint_sha256") or DASH)}</dd>
  <dt>Valid until</dt><dd>{esc(ca.get("not_after") or DASH)}</dd>
</dl>
</section>"""


def render_status_page(status: Mapping, *, refresh_seconds: int = 10, error: str = "",
                       now: Optional[float] = None) -> str:
    """The whole page as a string. ``error`` (escaped) is shown when ``status()`` itself failed."""
    status = _mapping(status)
    sections = []
    if error:
        sections.append(f'<section id="status-error" class="error"><h2>Status unavailable</h2>'
                        f"<p>{esc(error)}</p></section>")
    sections += [_health(status), _summary(status), _errors(status), _denied(status),
                 _artifacts(status), _lifecycle(status), _upstreams(status), _cache(status),
                 _doors(status), _fleet(status) if status.get("fleet") else "", _ca(status)]
    sections = [s for s in sections if s]
    refresh = (f'<meta http-equiv="refresh" content="{int(refresh_seconds)}">'
               if refresh_seconds > 0 else "")
    rendered = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() if now is None else now))
    return _template().substitute(
        refresh=refresh,
        version=esc(status.get("version") or DASH),
        uptime=esc(human_duration(status.get("uptime_seconds"))),
        ready_badge=_ready_badge(status) + " " + _health_badge(status),
        sections="\n".join(sections),
        rendered_at=esc(rendered),
        refresh_note=esc(f", refreshes every {int(refresh_seconds)}s" if refresh_seconds > 0 else ""),
    )
