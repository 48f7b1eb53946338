#!/usr/bin/env bash
# The checks that need a CUDA GPU, for a lent machine (device tool): it has
# torch, triton and transformers; nothing is fetched from the network.
# Wheels it lacks (pytest, pydantic, gguf) travel in .gpu_wheels/, and the
# Rust extension built here (python/mistralrs_serve/_native.abi3.so, abi3,
# libc only) travels with the tree: device run with
#   carry: [".gpu_wheels", "python/mistralrs_serve/_native.abi3.so"]
# Fill .gpu_wheels once (it is git-ignored via .git/info/exclude):
#   .venv/bin/pip download --no-deps -d .gpu_wheels pytest pluggy iniconfig packaging pygments \
#       gguf "pydantic==$(.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')" \
#       annotated-types typing-inspection typing_extensions
#   plus pydantic-core of the same version for cp310..cp313 (--only-binary=:all: --python-version
#   3.1x --platform manylinux2014_x86_64): the machine's Python version is not known in advance
#   bash ci/gpu_check.sh            # prints test results, then JSON lines
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
for pkg in pytest pydantic gguf; do
    python -c "import $pkg" 2>/dev/null || python -m pip install -q --no-index --find-links .gpu_wheels "$pkg"
done
export PYTHONPATH="$PWD/kernels:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
# every kernel test compiled on CUDA, bf16 included (the gpu marker is not deselected
# here), and the engine's Triton path against its torch path on a tiny model
python -m pytest -q -p no:cacheprovider -o addopts="" --rootdir=. -c /dev/null tests/kernels
status=$?
python bench/triton_kernels.py
# a random-weight Llama-3.2-1B shape: decode at batch 1 against the HBM roofline, with
# CUDA graphs and without, then throughput at 1/8/32 concurrent
python bench/throughput.py --device cuda --model random:1b --num-requests 16 --concurrency 1 8 32
python bench/throughput.py --device cuda --model random:1b --smoke --enforce-eager
exit $status
