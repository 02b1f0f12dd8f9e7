"""README's "Running the stack yourself", run as written on a copy of the repository, across a restart."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexusgen import embedded
from tests.e2e.conftest import ROOT, SERVICE_VARS, free_port, port_in_use

SECTION = "### Running the stack yourself"


def readme_blocks() -> list[str]:
    """The ```sh blocks of the README's manual section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ")]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def quiet_port() -> int:
    """A free port below Linux's ephemeral range (32768+), which outgoing connections and port-0 binds of
    the other tests use: `up` binds the API minutes after the test picks the port, across a restart."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if embedded.port_bindable(port):
            return port
    return free_port()


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a clone has them (tracked and unignored), with the shared virtualenv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


class Terminal:
    """One shell session of the README reader: blocks run in bash, exports carry over to the next block."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, dict(env)

    def run(self, block: str, timeout_s: float = 400) -> subprocess.CompletedProcess[str]:
        dump = self.cwd / ".terminal-env"
        script = f"set -e\n{block}\nenv -0 > {dump}\n"
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert done.returncode == 0, (
            f"block failed:\n{block}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
        self.env = dict(item.split("=", 1) for item in dump.read_text().split("\0") if "=" in item)
        return done


class UpTerminal:
    """The first terminal: `nexusgen up` in the foreground, stopped by Ctrl-C (SIGINT to its group)."""

    def __init__(self, block: str, cwd: Path, env: dict[str, str]) -> None:
        self.block, self.cwd, self.env = block, cwd, env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 300) -> dict[str, object]:
        log = (self.cwd / "up-terminal.log").open("ab")
        self.process = subprocess.Popen(
            ["bash", "-c", self.block],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        info_path = self.cwd / ".nexusgen" / "up.json"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if info_path.exists():
                return dict(json.loads(info_path.read_text()))
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"`nexusgen up` did not come up:\n{self.log_tail()}")

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"`nexusgen up` did not stop on Ctrl-C:\n{self.log_tail()}")

    def log_tail(self) -> str:
        logs = [self.cwd / "up-terminal.log", *sorted((self.cwd / ".nexusgen" / "logs").glob("*.log"))]
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())


@pytest.fixture
def clone_dir() -> Iterator[Path]:
    # Outside pytest's 0700 temp root: the embedded PostgreSQL runs as an unprivileged user.
    path = Path(tempfile.mkdtemp(prefix="nexusgen-readme-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_readme_manual_section_works_as_written_across_a_restart(clone_dir: Path) -> None:
    up_block, setup_block, after_restart_block = readme_blocks()
    assert up_block.strip().startswith(".venv/bin/nexusgen up")
    clone = fresh_copy(clone_dir)
    # The reader's environment: no service URLs; API and Flower moved off 8080/5555 (README says how).
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS and not k.startswith("NEXUSGEN_")}
    env.update(
        PYTHONPATH=str(clone),  # what `make install` (an editable install of this copy) would give
        NEXUSGEN_API_PORT=str(quiet_port()),
        NEXUSGEN_FLOWER_PORT=str(quiet_port()),
        NEXUSGEN_BATCH_WINDOW_S="0.5",  # both jobs in one model call
        OMP_NUM_THREADS="1",
    )
    up = UpTerminal(up_block, clone, env)
    terminal = Terminal(clone, env)
    try:
        first = up.start()
        done = terminal.run(setup_block)
        assert "tenant_id: ten_" in done.stdout and "2 downloaded, 0 already there" in done.stdout
        pngs = sorted(p.name for p in (clone / "results").iterdir())
        assert len(pngs) == 2 and all((clone / "results" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
        # the sourced env names the embedded servers
        assert terminal.env["DATABASE_URL"] == dict(first["env"])["DATABASE_URL"]  # type: ignore[call-overload]

        assert up.stop() == 0, up.log_tail()
        assert not (clone / ".nexusgen" / "up.json").exists()
        second = up.start()
        # same ports: the URLs the second terminal sourced before the restart still work
        assert dict(second["env"]) == dict(first["env"])  # type: ignore[call-overload]
        done = terminal.run(after_restart_block)
        assert "tenant_id: ten_" in done.stdout and "2 downloaded, 0 already there" in done.stdout
        assert sorted(p.name for p in (clone / "results-again").iterdir()) == pngs
    finally:
        if up.process is not None:
            up.stop()
    assert not port_in_use(int(env["NEXUSGEN_API_PORT"]))
