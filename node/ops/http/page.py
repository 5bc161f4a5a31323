"""The read-only status page ``/``: recent studies, jobs, results with heatmap previews.

Plain HTML that refreshes itself every few seconds; no JavaScript framework.  No
patient attribute is ever read for it: studies are shown by a short hash of their
UID (the same tag as in the logs), and job errors pass through the same masking as
log lines (person names, UIDs).  Every value is HTML-escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from node.config import priority_name
from node.logs import mask_phi, uid_tag
from node.store.db import Database, Instance, Job, JobKind, JobStatus, Result, Study

__all__ = ["IMG_ONLOAD", "PAGE_CSP", "render_status_page", "scrub"]

REFRESH_S = 10
MAX_STUDIES = 50
MAX_JOBS = 100
MAX_RESULTS = 24


#: The only script on the page: marks a preview as loaded (or broken) for viewers and
#: tests.  Allowed by hash, so the CSP still forbids any other script.
IMG_ONLOAD = "this.dataset.state='loaded'"
IMG_ONERROR = "this.dataset.state='broken'"


def _csp_hash(src: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(src.encode()).digest()).decode() + "'"


PAGE_CSP = (
    "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
    f"script-src 'unsafe-hashes' {_csp_hash(IMG_ONLOAD)} {_csp_hash(IMG_ONERROR)}; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eee} td.err{color:#a00;max-width:40em;word-break:break-word}
.s-done,.s-scheduled{color:#070} .s-dead,.s-unrouted{color:#a00} .s-failed{color:#b60}
.s-running,.s-receiving{color:#05a} .muted{color:#777}
.previews{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:.4em}
figure img{display:block;max-width:384px;max-height:384px}
figcaption{font-size:.85em;color:#555;margin-top:.3em}
"""


def scrub(text: str | None, limit: int = 300) -> str:
    """Mask person names and UIDs in free text (job errors) as the logs do, and shorten it."""
    if not text:
        return ""
    masked = mask_phi(text)
    return masked if len(masked) <= limit else masked[: limit - 1] + "…"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def age(seconds: float) -> str:
    """A short human age: ``12 s``, ``3 min``, ``5 h``, ``2 d``."""
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:.0f} d"


@dataclass(frozen=True)
class _Data:
    studies: list[tuple[Study, str]]
    jobs: list[Job]
    results: list[Result]
    counts: dict[tuple[str, str], int]


def _load(db: Database) -> _Data:
    with db.read() as s:
        studies = list(
            s.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(MAX_STUDIES))
        )
        uids = [st.study_instance_uid for st in studies]
        mods: dict[str, set[str]] = {u: set() for u in uids}
        if uids:
            for uid, mod in s.execute(
                select(Instance.study_instance_uid, Instance.modality)
                .where(Instance.study_instance_uid.in_(uids))
                .distinct()
            ):
                if mod:
                    mods[uid].add(str(mod))
        jobs = list(s.scalars(select(Job).order_by(Job.updated_at.desc()).limit(MAX_JOBS)))
        results = list(
            s.scalars(select(Result).order_by(Result.created_at.desc()).limit(MAX_RESULTS))
        )
        counts = {
            (str(k), str(st)): int(n)
            for k, st, n in s.execute(
                select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
            )
        }
    return _Data(
        studies=[(st, ", ".join(sorted(mods[st.study_instance_uid]))) for st in studies],
        jobs=jobs,
        results=results,
        counts=counts,
    )


def _target(job: Job) -> str:
    payload: dict[str, Any] = job.payload if isinstance(job.payload, dict) else {}
    key = "model" if job.kind == JobKind.INFER else "destination"
    value = payload.get(key)
    return str(value) if isinstance(value, str) else ""


def _not_analysed(job: Job) -> str:
    """Why a done infer job produced no output for a series (the model's input guards)."""
    payload: dict[str, Any] = job.payload if isinstance(job.payload, dict) else {}
    items = payload.get("not_analysed")
    if not isinstance(items, list) or not items:
        return ""
    reasons = [r for it in items if isinstance(it, dict) for r in it.get("reasons", [])]
    return "not analysed: " + "; ".join(str(r) for r in reasons)


def _summary(counts: dict[tuple[str, str], int]) -> str:
    cells = []
    for k in JobKind:
        parts = [
            f'<span class="s-{_e(st.value)}">{_e(st.value)} {counts.get((k.value, st.value), 0)}'
            "</span>"
            for st in JobStatus
        ]
        cells.append(f"<tr><th>{_e(k.value)}</th><td>{' · '.join(parts)}</td></tr>")
    return '<table id="summary" style="width:auto">' + "".join(cells) + "</table>"


def _purged(st: Study, t: float) -> str:
    """A note that retention removed the study's instances (docs/operations.md)."""
    if st.purged_at is None:
        return ""
    return f' <span class="purged">(purged {_e(age(t - st.purged_at))} ago)</span>'


def render_status_page(db: Database, *, node_name: str = "airnode") -> str:
    """The HTML of ``/``, built from the job table now."""
    t = time.time()
    data = _load(db)
    out: list[str] = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        f"<title>{_e(node_name)} status</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(node_name)}</h1>",
        f'<p class="muted">Read-only status, refreshed every {REFRESH_S} s. '
        'Machine-readable: <a href="/health">/health</a>, <a href="/metrics">/metrics</a>.</p>',
        "<h2>Jobs</h2>",
        _summary(data.counts),
        "<h2>Recent studies</h2>",
    ]
    if data.studies:
        out.append(
            '<table id="studies"><thead><tr><th>study</th><th>modality</th><th>state</th>'
            '<th title="rule that found the study complete">complete by</th>'
            "<th>instances</th><th>last image</th><th>note</th></tr></thead><tbody>"
        )
        for st, mods in data.studies:
            out.append(
                f'<tr class="study" data-state="{_e(st.state.value)}">'
                f"<td><code>{_e(uid_tag(st.study_instance_uid))}</code></td>"
                f"<td>{_e(mods)}</td>"
                f'<td class="s-{_e(st.state.value)}">{_e(st.state.value)}</td>'
                f'<td data-rule="{_e(st.complete_rule or "")}">{_e(st.complete_rule or "")}</td>'
                f"<td>{st.instance_count}{_purged(st, t)}</td>"
                f"<td>{_e(age(t - st.last_received_at))} ago</td>"
                f"<td>{_e(scrub(st.note, 120))}</td></tr>"
            )
        out.append("</tbody></table>")
    else:
        out.append('<p class="muted" id="no-studies">No study received yet.</p>')

    out.append("<h2>Recent jobs</h2>")
    if data.jobs:
        out.append(
            '<table id="jobs"><thead><tr><th>#</th><th>kind</th><th>priority</th>'
            "<th>model / destination</th>"
            "<th>study</th><th>status</th><th>attempts</th><th>updated</th><th>last error</th>"
            "</tr></thead><tbody>"
        )
        for j in data.jobs:
            out.append(
                f'<tr class="job" data-kind="{_e(j.kind.value)}" '
                f'data-status="{_e(j.status.value)}">'
                f"<td>{j.id}</td><td>{_e(j.kind.value)}</td>"
                f'<td class="prio">{_e(priority_name(j.priority))}</td>'
                f"<td>{_e(_target(j))}</td>"
                f"<td><code>{_e(uid_tag(j.study_instance_uid))}</code></td>"
                f'<td class="s-{_e(j.status.value)}">{_e(j.status.value)}</td>'
                f"<td>{j.attempts}/{j.max_attempts}</td>"
                f"<td>{_e(age(t - j.updated_at))} ago</td>"
                f'<td class="err">{_e(scrub(j.last_error or _not_analysed(j)))}</td></tr>'
            )
        out.append("</tbody></table>")
    else:
        out.append('<p class="muted" id="no-jobs">No job yet.</p>')

    out.append("<h2>Recent results</h2>")
    if data.results:
        out.append(
            '<table id="results"><thead><tr><th>#</th><th>kind</th><th>model</th><th>study</th>'
            "<th>created</th></tr></thead><tbody>"
        )
        for r in data.results:
            out.append(
                f'<tr class="result" data-kind="{_e(r.kind)}"><td>{r.id}</td><td>{_e(r.kind)}</td>'
                f"<td>{_e(r.model)}</td><td><code>{_e(uid_tag(r.study_instance_uid))}</code></td>"
                f"<td>{_e(age(t - r.created_at))} ago</td></tr>"
            )
        out.append("</tbody></table>")
        previews = [r for r in data.results if r.kind == "sc"]
        if previews:
            out.append('<h2>Heatmap previews</h2><div class="previews">')
            for r in previews:
                out.append(
                    f'<figure><img class="preview" src="/preview/{r.id}.png" '
                    f'alt="heatmap {r.id}" loading="eager" data-state="pending" '
                    f'onload="{_e(IMG_ONLOAD)}" onerror="{_e(IMG_ONERROR)}">'
                    f"<figcaption>#{r.id} {_e(r.model)} · "
                    f"<code>{_e(uid_tag(r.study_instance_uid))}</code></figcaption></figure>"
                )
            out.append("</div>")
    else:
        out.append('<p class="muted" id="no-results">No result yet.</p>')
    out.append("</body></html>")
    return "\n".join(out)
