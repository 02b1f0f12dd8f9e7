"""`/docs` in a real headless Chromium with no network but loopback: Swagger UI renders every operation."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Runs inside a new network namespace: bring up loopback, serve the app, let Chromium render /docs.
SCRIPT = r"""
set -e
ip link set lo up
"$PYTHON" - <<'EOF' &
from werkzeug.serving import make_server
from api.app import create_app
from core.settings import Settings
settings = Settings(
    database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",  # /docs needs no database
    s3_endpoint_url="http://127.0.0.1:1",
    api_port=8080,
)
make_server("127.0.0.1", 8080, create_app(settings)).serve_forever()
EOF
SERVER=$!
connects() {
  "$PYTHON" -c "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)" "$@"
}
for _ in $(seq 100); do connects 127.0.0.1 8080 2>/dev/null && break; sleep 0.2; done
if connects 1.1.1.1 443 2>/dev/null; then
  echo "NETWORK-REACHABLE"
fi
"$CHROMIUM" --headless --no-sandbox --disable-gpu --user-data-dir="$PROFILE" --virtual-time-budget=15000 \
  --dump-dom http://127.0.0.1:8080/docs 2>/dev/null
kill $SERVER
"""


def _can_unshare() -> bool:
    return bool(shutil.which("unshare") and shutil.which("ip")) and (
        subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -n` (root or user namespaces) and `ip`")
def test_swagger_ui_renders_without_network(tmp_path: Path) -> None:
    # In its own namespace 8080 is free whatever runs on the host: no port of the machine is used.
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        CHROMIUM=str(CHROMIUM),
        PROFILE=str(tmp_path / "profile"),
        PYTHONPATH=str(ROOT),
        HOME=str(tmp_path),
    )
    done = subprocess.run(
        ["unshare", "-n", "bash", "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    dom = done.stdout
    assert "NETWORK-REACHABLE" not in dom, "the namespace was supposed to have no network"
    assert 'id="swagger-ui"' in dom, done.stderr[-3000:]
    paths = set(re.findall(r'data-path="([^"]+)"', dom))
    # every operation of the spec is drawn (Swagger UI renders nothing when its assets do not load)
    assert {"/v1/jobs", "/v1/batches", "/v1/uploads", "/healthz"} <= paths, sorted(paths)
    assert "OAS 3.1" in dom or "OAS3.1" in dom.replace(" ", "")
