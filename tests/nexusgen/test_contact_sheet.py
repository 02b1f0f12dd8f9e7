"""The demo's contact sheet: a header on the run, inputs beside outputs, printable texts, a model note."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from nexusgen.contact_sheet import RunSummary, printable, write_contact_sheet


def _job(custom_id: str, task: str, started: str, finished: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "job_" + custom_id,
        "custom_id": custom_id,
        "task": task,
        "status": "succeeded",
        "created_at": "2026-01-01T10:00:00+00:00",
        "started_at": started,
        "finished_at": finished,
        "provenance": {"batch_size": 2},
        **extra,
    }


class _Figures(HTMLParser):
    """For each <figure>: the images of its input/output row, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[list[str]] = []
        self.in_pair = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "figure":
            self.figures.append([])
        elif tag == "div" and values.get("class") == "pair":
            self.in_pair = True
        elif tag == "img" and self.in_pair:
            self.figures[-1].append(values["src"] or "")
        elif tag == "pre" and self.in_pair:
            self.figures[-1].append("<text>")

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self.in_pair = False


def test_contact_sheet_header_pairs_and_printable_texts(tmp_path: Path) -> None:
    (tmp_path / "00-generate.png").write_bytes(b"png")
    (tmp_path / "01-edit.png").write_bytes(b"png")
    (tmp_path / "02-understand.txt").write_text("a \x07bell\x1b[31m and\u200b\ttab\nline", encoding="utf-8")
    jobs = [
        _job("00-generate", "generate", "2026-01-01T10:00:01+00:00", "2026-01-01T10:00:05+00:00"),
        _job("01-edit", "edit", "2026-01-01T10:00:02+00:00", "2026-01-01T10:00:09+00:00"),
        _job("02-understand", "understand", "2026-01-01T10:00:03+00:00", "2026-01-01T10:00:04+00:00"),
    ]
    files = {
        j["id"]: tmp_path / (j["custom_id"] + (".txt" if j["task"] == "understand" else ".png")) for j in jobs
    }
    specs = {
        "00-generate": {"prompt": "a fox\x00", "params": {"language": "en"}},
        "01-edit": {
            "instruction": "make it night",
            "image": "input-landscape.png",
            "params": {"decoder": "edit"},
        },
        "02-understand": {"instruction": "what?", "image": "input-shapes.png", "params": {}},
    }
    run = RunSummary(
        batch_id="bat_123",
        tenant="demo-x",
        submitted_at="2026-01-01T10:00:00+00:00",
        completed_at="2026-01-01T10:00:10+00:00",
        stack_start_s=42.0,
        webhooks_verified=4,
        webhooks_rejected=0,
        webhooks_all_arrived=True,
        tiny_model=True,
    )
    page = write_contact_sheet(tmp_path, run, jobs, files, specs).read_text(encoding="utf-8")

    header = page[page.index("<header>") : page.index("</header>")]
    assert "bat_123" in header and "3/3 succeeded" in header
    assert "10.0 s after submission" in header and "stack start 42 s" in header
    assert "1.0 to 7.0 s per job" in header
    assert "4 received with a valid signature, 0 rejected; every expected event arrived" in header
    assert "tiny random checkpoint" in header and "noise" in header
    # an edit's input and its output sit in one row, input first; an understanding's answer beside its image
    figures = _Figures()
    figures.feed(page)
    assert figures.figures == [
        ["00-generate.png"],
        ["input-landscape.png", "01-edit.png"],
        ["input-shapes.png", "<text>"],
    ]
    # no raw control characters reach the page; they are shown as control pictures
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u200b]", page)
    assert "\u2407bell\u241b[31m" in page and "\ttab\nline" in page

    run.tiny_model, run.webhooks_all_arrived, run.webhooks_rejected = False, False, 1
    page = write_contact_sheet(tmp_path, run, jobs, files, specs).read_text(encoding="utf-8")
    assert "tiny random checkpoint" not in page and "some expected events did not arrive" in page
    assert "class='bad'>4 received" in page


def test_printable_keeps_text_and_shows_controls() -> None:
    assert printable("熊猫 ok\n\t") == "熊猫 ok\n\t"
    assert printable("a\x00b\x7f\u202e") == "a\u2400b\ufffd\ufffd"
