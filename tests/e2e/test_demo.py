"""`nexusgen demo` end to end in a fresh directory: exit 0, every output and the contact sheet present."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import stack_env


@pytest.mark.slow
def test_demo_runs_end_to_end(stack_dir: Path) -> None:
    # The default state dir (.nexusgen under the working directory), as `make demo` uses it.
    env = stack_env(stack_dir / ".nexusgen")
    del env["NEXUSGEN_STATE_DIR"]
    result = subprocess.run(
        [sys.executable, "-m", "nexusgen.cli", "demo", "--jobs", "8", "--size", "256", "--steps", "2"],
        cwd=stack_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    logs = "\n".join(
        p.read_text(errors="replace")[-3000:] for p in (stack_dir / ".nexusgen" / "logs").glob("*.log")
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}\n{logs}"
    out = stack_dir / "demo-output"
    assert len(list(out.glob("*-generate.png"))) == 3
    assert len(list(out.glob("*-edit.png"))) == 3
    texts = list(out.glob("*-understand.txt"))
    assert len(texts) == 2  # the tiny random model may answer with an empty text
    sheet = (out / "index.html").read_text(encoding="utf-8")
    assert "一只在竹林里" in sheet and sheet.count("<figure>") == 8
    header = sheet[sheet.index("<header>") : sheet.index("</header>")]
    batch_id = re.search(r"batch (bat_\w+)", result.stderr).group(1)  # type: ignore[union-attr]
    assert batch_id in header and "8/8 succeeded" in header
    assert "after submission" in header and "0 rejected; every expected event arrived" in header
    assert "tiny random checkpoint" in header  # the reader is told why the pictures are noise
    assert sheet.count('<div class="pair"><img src="input-') == 5  # 3 edits, 2 understandings
    assert "8/8 jobs succeeded" in result.stderr and "0 rejected" in result.stderr
    assert not (stack_dir / ".nexusgen" / "up.json").exists()  # the stack was shut down
