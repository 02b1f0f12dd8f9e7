#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before bench/gpu_session.sh: the GPU image has torch, transformers
# (an older 5.x), accelerate, matplotlib, pytest and pillow, but not diffusers, torchao, sqlalchemy or the
# transformers release this code is written against. pip on the GPU machine cannot reach any registry,
# so the wheels travel in .whl/ (ignored by git) and the `run` call names `.whl` in its carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 transformers==5.24.0 torchao==0.18.0 sqlalchemy==2.1.9 greenlet \
  importlib_metadata==10.2.0 typing_extensions==4.16.0 huggingface_hub==2.4.0
du -sh .whl
