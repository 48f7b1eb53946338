#!/usr/bin/env bash
# The checks that need a CUDA GPU, for a lent machine (device tool): it has
# torch, triton and transformers; nothing is fetched from the network.
# Wheels it lacks (pytest) travel in .gpu_wheels/ (see bench/README.md).
#   bash ci/gpu_check.sh            # prints test results, then JSON lines
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
if ! python -c "import pytest" 2>/dev/null; then
    pip install -q --no-index --find-links .gpu_wheels pytest
fi
export PYTHONPATH="$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
# every kernel test compiled on CUDA, bf16 included (the gpu marker is not deselected here)
python -m pytest -q -p no:cacheprovider -o addopts="" --rootdir=. -c /dev/null tests/kernels
status=$?
python bench/kernels.py
exit $status
