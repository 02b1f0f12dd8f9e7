"""The demo's contact sheet (demo-output/index.html): a header on the run, then each input and output."""

from __future__ import annotations

import html
import json
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
header{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 18px;margin-bottom:16px}
header h1{margin:0 0 8px;font-size:22px}
header dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}
header dt{color:#666} header dd{margin:0}
.ok{color:#1a7f37;font-weight:600} .bad{color:#cf222e;font-weight:600}
.note{background:#fff8c5;border:1px solid #e3d38a;border-radius:6px;padding:8px 12px;margin:12px 0 0}
main{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px;width:min-content}
.pair{display:flex;align-items:center;gap:8px;white-space:nowrap}
.pair img{border:1px solid #ccc;image-rendering:pixelated;display:block}
.arrow{font-size:22px;color:#888}
figcaption{margin-top:8px;font-size:13px;min-width:256px}
figcaption .meta{color:#666}
pre{white-space:pre-wrap;word-break:break-word;background:#f3f3f3;padding:6px;margin:0;width:256px;
  font-size:12px;min-height:40px}
"""


@dataclass
class RunSummary:
    """What the header says about the run."""

    batch_id: str
    tenant: str
    submitted_at: str | None  # ISO times from the API
    completed_at: str | None
    stack_start_s: float
    webhooks_verified: int
    webhooks_rejected: int
    webhooks_all_arrived: bool
    tiny_model: bool  # NEXUSGEN_MODEL_DIR unset: a tiny random checkpoint drew these


def printable(text: str) -> str:
    """Text as it can be shown: control and format characters (but newline and tab) made visible."""
    out = []
    for char in text:
        if char in "\n\t":
            out.append(char)
        elif unicodedata.category(char)[0] == "C":
            code = ord(char)
            # C0 controls have a visible "control picture" (U+2400 + code); the rest a replacement mark
            out.append(chr(0x2400 + code) if code < 0x20 else "\ufffd")
        else:
            out.append(char)
    return "".join(out)


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not (start and end):
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def task_label(job: dict[str, Any], spec: dict[str, Any]) -> str:
    """The task, with the decoder for edits and the language when it is not English."""
    params = spec.get("params", {})
    extras = [params["decoder"] + " decoder"] if job["task"] == "edit" and "decoder" in params else []
    extras += [params["language"]] if params.get("language", "en") != "en" else []
    return job["task"] + (f" ({', '.join(extras)})" if extras else "")


def _header(run: RunSummary, jobs: list[dict[str, Any]]) -> str:
    succeeded = sum(job["status"] == "succeeded" for job in jobs)
    wall = seconds_between(run.submitted_at, run.completed_at)
    ran = [
        s for s in (seconds_between(j.get("started_at"), j.get("finished_at")) for j in jobs) if s is not None
    ]
    webhooks_ok = run.webhooks_all_arrived and not run.webhooks_rejected
    verdict = (
        f"{run.webhooks_verified} received with a valid signature, {run.webhooks_rejected} rejected; "
        + (
            "every expected event arrived"
            if run.webhooks_all_arrived
            else "some expected events did not arrive"
        )
    )
    rows = [
        ("batch", f"<code>{html.escape(run.batch_id)}</code> (tenant {html.escape(run.tenant)})"),
        (
            "jobs",
            f"<span class='{'ok' if succeeded == len(jobs) else 'bad'}'>"
            f"{succeeded}/{len(jobs)} succeeded</span>",
        ),
        ("submitted", html.escape(run.submitted_at or "-")),
        (
            "timings",
            f"stack start {run.stack_start_s:.0f} s; batch done "
            + (f"{wall:.1f} s after submission" if wall is not None else "(not completed)")
            + (f"; on the workers {min(ran):.1f} to {max(ran):.1f} s per job" if ran else ""),
        ),
        ("webhooks", f"<span class='{'ok' if webhooks_ok else 'bad'}'>{html.escape(verdict)}</span>"),
    ]
    note = (
        "<p class='note'>These outputs come from a <b>tiny random checkpoint</b> in the official layout "
        "(<code>NEXUSGEN_MODEL_DIR</code> unset): its images are noise and its answers random tokens. "
        "The demo shows the service (batching, storage, webhooks), not the model; set "
        "<code>NEXUSGEN_MODEL_DIR</code> to the real weights for real pictures.</p>"
        if run.tiny_model
        else ""
    )
    cells = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return f"<header><h1>nexusgen demo</h1><dl>{cells}</dl>{note}</header>"


def _card(job: dict[str, Any], spec: dict[str, Any], path: Path | None) -> str:
    name = html.escape(job.get("custom_id") or job["id"])
    text = html.escape(printable(spec.get("prompt") or spec.get("instruction") or ""))
    ran = seconds_between(job.get("started_at"), job.get("finished_at"))
    batch_size = (job.get("provenance") or {}).get("batch_size")
    meta = ", ".join(
        part
        for part in (
            html.escape(task_label(job, spec)),
            job["status"],
            f"ran {ran:.1f} s" if ran is not None else "",
            f"in a model call of {batch_size}" if batch_size else "",
        )
        if part
    )
    source = ""
    if spec.get("image"):
        source = (
            f'<img src="{html.escape(spec["image"])}" width="128" alt="input">'
            '<span class="arrow">&rarr;</span>'
        )
    if path is not None and path.suffix == ".png":
        body = (
            f'<div class="pair">{source}<img src="{html.escape(path.name)}" width="256" alt="output"></div>'
        )
    elif path is not None:
        answer = printable(path.read_text(encoding="utf-8", errors="replace")) or "(empty answer)"
        body = f'<div class="pair">{source}<pre>{html.escape(answer)}</pre></div>'
    else:
        body = f"<pre>{html.escape(printable(json.dumps(job.get('error'), ensure_ascii=False)))}</pre>"
    caption = f"<b>{name}</b> <span class='meta'>{meta}</span><br>{text}"
    return f"<figure>{body}<figcaption>{caption}</figcaption></figure>"


def write_contact_sheet(
    out_dir: Path,
    run: RunSummary,
    jobs: list[dict[str, Any]],
    files: dict[str, Path],
    specs: dict[str, dict[str, Any]],
) -> Path:
    """index.html: the header, then every output beside its input, with prompt, timings and status.

    `specs` maps custom_id to the submitted job, whose `image` was replaced by the input's file name.
    """
    cards = [_card(job, specs.get(job.get("custom_id") or "", {}), files.get(job["id"])) for job in jobs]
    page = (
        "<!doctype html><html lang='en'><meta charset='utf-8'>"
        f"<title>nexusgen demo {html.escape(run.batch_id)}</title><style>{STYLE}</style>"
        + _header(run, jobs)
        + "<main>"
        + "\n".join(cards)
        + "</main></html>"
    )
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
