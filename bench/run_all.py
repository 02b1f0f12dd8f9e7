"""Run every benchmark, one after the other, in fresh processes: `python -m bench.run_all [ARGS...]`.

Extra arguments (e.g. `--device cuda --runs 5`) are passed to every bench. Results land in bench/results/.
"""

from __future__ import annotations

import subprocess
import sys
import time

# The model benches take the shared --device/--threads/--runs flags; the service benches run with defaults.
BENCHES = ("bench.bench_image_tokens", "bench.bench_decoders")
SERVICE_BENCHES = (
    "bench.bench_ingest",
    "bench.bench_get",
    "bench.bench_service",
    "bench.bench_queue",
    "bench.bench_deliveries",
)


def main() -> int:
    failed = []
    runs = [(name, sys.argv[1:]) for name in BENCHES] + [(name, []) for name in SERVICE_BENCHES]
    for name, args in runs:
        print(f"=== {name}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", name, *args])
        print(f"=== {name}: exit {code} in {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
