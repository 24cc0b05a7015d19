#!/usr/bin/env bash
# One-command GPU check (issue 14.2): ViT-B/16 bf16 step throughput with and without QSRCallback, one sync's local
# work, NCCL AVG vs SUM + divide, the input pipeline. Fits 8 minutes on one H100/H200; writes
# benchmarks/results/gpu_check.json (gpu_check_tiny.json with --tiny). Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: no GPU"
timeout 480 python benchmarks/gpu_check.py "$@"
