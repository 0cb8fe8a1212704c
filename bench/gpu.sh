#!/usr/bin/env bash
# The GPU check in one command: environment, serving, training and extraction on CUDA, written
# as gpu.json and gpu.md into RESULTS_DIR (default bench/results/). See bench/gpu.py.
#
#   bash bench/gpu.sh [RESULTS_DIR] [bench/gpu.py flags]
#
# On a machine without an NVIDIA GPU it says so in one line and exits 0. Where `aet` is not
# installed (a bare GPU machine with torch and onnxruntime-gpu but no `pip install .`), the
# checkout is put on PYTHONPATH the way it installs: aet/ plus training, server, clients, proto
# as aet.training, aet.server, ... (pyproject.toml's package-dir).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
if ! "$python" -c "import aet.training" 2>/dev/null; then
    tree="$(mktemp -d)/site"
    mkdir -p "$tree/aet"
    ln -s "$root"/aet/*.py "$tree/aet/"
    for folder in training server clients proto; do ln -s "$root/$folder" "$tree/aet/$folder"; done
    export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$python" "$root/bench/gpu.py" "$@"
