#!/usr/bin/env bash
# The benchmark table on a CUDA machine, in under 5 minutes (M3BSR vs SASRec training with bf16
# autocast, evaluation, latency, memory; no scaling curves). Run from anywhere:
#
#     bash benchmarks/gpu.sh [extra benchmarks/run.py flags, e.g. --compile]
#
# Uses $PYTHON if set, else an existing .venv of the checkout, else creates .venv-gpu with the
# system python (--system-site-packages, so a system CUDA torch is used) and installs the package
# (editable, without replacing torch: pyproject pins the CPU test build). Results: reproduce/results/<host>-<date>-cuda.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY=.venv/bin/python
else
  if [[ ! -x .venv-gpu/bin/python ]]; then
    python3 -m venv --system-site-packages .venv-gpu  # reuse a system CUDA torch when there is one
  fi
  PY=.venv-gpu/bin/python
fi
if ! "$PY" -c "import m3bsr" 2>/dev/null; then
  # keep the machine's CUDA torch: install the other dependencies, then the package without deps
  "$PY" -m pip install --quiet numpy pandas pyarrow pyyaml pydantic tqdm matplotlib safetensors scipy || true
  "$PY" -m pip install --quiet --no-deps -e .
fi
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"benchmarks/gpu.sh: torch {torch.__version__} sees no CUDA device; install a CUDA build of torch")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
PYEOF
export M3BSR_BENCH_WORK="${M3BSR_BENCH_WORK:-${TMPDIR:-/tmp}/m3bsr-bench}"
# 2 alternating rounds x 8 timed steps per model and d; every measurement is its own process.
exec "$PY" benchmarks/run.py --device cuda --threads 4 --eval-threads 4 \
  --rounds 2 --steps 8 --no-curves "$@"
