#!/usr/bin/env bash
# The one command a session with a GPU runs (after bench/gpu_wheels.sh here), through the device tool:
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=590)
# It runs the full-size benchmark within a time budget (it writes its JSON after every configuration,
# so a cut run still reports), then the GPU tests; logs, gpu.json and gpu.png land in $OUT.
set -uo pipefail
OUT=${OUT:-bench/results}
BUDGET_S=${BUDGET_S:-360}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi; python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"; } 2>&1 | tee "$OUT/env.txt"
timeout $((BUDGET_S + 120)) python3 -m bench.bench_gpu --device cuda --budget-s "$BUDGET_S" --out "$OUT" 2>&1 | tee "$OUT/bench_gpu.log"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/model 2>&1 | tee "$OUT/pytest_gpu.log"
ls -la "$OUT"
