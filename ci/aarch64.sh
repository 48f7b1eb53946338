#!/usr/bin/env bash
# aarch64 on an x86_64 machine, through Debian's qemu-user-static (no binfmt needed:
# every aarch64 program is started through qemu here).
#
#   bash ci/aarch64.sh kernels   # the native CPU crate's tests cross-built for aarch64, run
#                                # on an emulated ARMv8.2 core with dot products (-cpu max:
#                                # the NEON and NEON-dotprod paths against the portable
#                                # loops) and on a Cortex-A72 (ARMv8.0: NEON alone)
#   bash ci/aarch64.sh wheel     # the aarch64 wheel from dist/ (ci/wheels.sh build) in an
#                                # arm64 Debian Python 3.11 with its dependencies' aarch64
#                                # wheels: imported, and an SDK chat request on the default
#                                # model on each NEON path, slowly
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mistralrs-serve/cargo-target}"
CACHE="$HOME/.cache/mistralrs-serve/aarch64"
SYSROOT="$CACHE/sysroot"
SITE="$CACHE/site"
BIN=.venv/bin
ARM_TORCH=2.10.0
# the arm64 Debian packages of the interpreter and the shared libraries wheels expect
DEBS=(gcc-12-base libbz2-1.0 libc6 libcom-err2 libcrypt1 libdb5.3 libexpat1 libffi8 libgcc-s1
    libgssapi-krb5-2 libk5crypto3 libkeyutils1 libkrb5-3 libkrb5support0 liblzma5 libncursesw6
    libnsl2 libpython3.11-minimal libpython3.11-stdlib libreadline8 libsqlite3-0 libssl3
    libstdc++6 libtinfo6 libtirpc3 libuuid1 python3.11-minimal python3.11 zlib1g libgomp1)

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

kernels() {
    apt_install qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross
    rustup target list --installed | grep -qx aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    # the aarch64-only code (gemm_neon.rs) is linted for its target too
    cargo clippy -q -p mistralrs-serve-cpu --all-targets --release --target aarch64-unknown-linux-gnu -- -D warnings
    for cpu in max cortex-a72; do
        echo "== mistralrs-serve-cpu tests on an emulated $cpu"
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu -cpu $cpu" \
            cargo test --release -q -p mistralrs-serve-cpu --target aarch64-unknown-linux-gnu
    done
}

sysroot() {
    [[ -x "$SYSROOT/usr/bin/python3.11" ]] && return
    dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64 && apt-get update -qq; }
    local debs
    debs=$(mktemp -d)
    (cd "$debs" && apt-get download -qq "${DEBS[@]/%/:arm64}")
    rm -rf "$SYSROOT" && mkdir -p "$SYSROOT"
    for deb in "$debs"/*.deb; do
        dpkg-deb -x "$deb" "$SYSROOT"
    done
    rm -rf "$debs"
}

wheel() {
    apt_install qemu-user-static
    sysroot
    # the wheel and its dependencies as resolved for aarch64 CPython 3.11 (uv evaluates the
    # markers for the target platform, which pip --platform does not), unpacked by this
    # machine: nothing runs under emulation but the check itself. torch is pinned to the
    # newest release whose aarch64 wheel is CPU-only (later ones pull in CUDA for aarch64).
    local constraints
    constraints=$(mktemp)
    grep -iv '^torch==\|^nvidia-\|^triton==\|^cuda-' constraints.txt >"$constraints"
    echo "torch==$ARM_TORCH" >>"$constraints"
    $BIN/pip install -q -c constraints.txt uv
    rm -rf "$SITE"
    $BIN/uv pip install -q --target "$SITE" --python-platform aarch64-manylinux_2_28 --python-version 3.11 \
        --only-binary :all: -c "$constraints" dist/mistralrs_serve-*manylinux*aarch64.whl \
        dist/mistralrs_serve_kernels-*.whl
    rm -f "$constraints"
    # the reference: this machine's portable loops on the probe's prompts
    local ref
    ref=$(mktemp)
    MISTRALRS_SERVE_CPU_PATH=portable $BIN/python tests/models/cpu_path_probe.py | tail -1 >"$ref"
    # on an emulated ARMv8.2 core with dot products: the NEON path with them, then the one
    # without (an ARMv8.0 core cannot run torch's aarch64 wheel: Illegal instruction on import)
    echo "== the aarch64 wheel under qemu-user (-cpu max): import, and an SDK request"
    arm_python neon-dotprod - <<'EOF'
import platform, time
start = time.perf_counter()
import mistralrs_serve
from mistralrs_serve import ChatCompletionRequest, Runner, Which, _native
assert platform.machine() == "aarch64", platform.machine()
print("imported", mistralrs_serve.__file__, "in", round(time.perf_counter() - start), "s")
print("CPU paths:", _native.QuantMatrix.supported_paths(), "chosen:", _native.QuantMatrix.kernel_path())
assert _native.QuantMatrix.kernel_path() == "neon-dotprod"
runner = Runner(which=Which.Default())
path = type(runner.client.engine.runner.path).__name__
assert path == "FusedPath", path  # the fused CPU forward, on the NEON kernels
out = runner.send_chat_completion_request(
    ChatCompletionRequest(messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0)
)
text = out.choices[0].message.content
assert text, out
print("aarch64 wheel answered:", repr(text), "in", round(time.perf_counter() - start), "s")
EOF
    # the two NEON paths agree as two paths on one machine do; against x86's portable loops
    # (other attention code too) the logits agree within the looser bound for two architectures
    local dot
    dot=$(mktemp)
    echo "== the aarch64 wheel's NEON paths against this machine's portable loops (tests/models/cpu_path_probe.py)"
    arm_python neon-dotprod "$(realpath tests/models/cpu_path_probe.py)" --against "$ref" --other-arch | tail -1 >"$dot"
    arm_python neon "$(realpath tests/models/cpu_path_probe.py)" --against "$dot" >/dev/null
    rm -f "$ref" "$dot"
}

# The arm64 Python with the aarch64 wheel, on MISTRALRS_SERVE_CPU_PATH=$1, running "${@:2}".
arm_python() {
    local path=$1
    shift
    (cd / && env -i PATH=/usr/bin:/bin HOME="$HOME" PYTHONPATH="$SITE" PYTHONNOUSERSITE=1 \
        LD_LIBRARY_PATH=/lib/aarch64-linux-gnu:/usr/lib/aarch64-linux-gnu MISTRALRS_SERVE_CPU_PATH="$path" \
        timeout 1200 qemu-aarch64-static -L "$SYSROOT" -cpu max "$SYSROOT/usr/bin/python3.11" "$@")
}

case "${1:-}" in
    kernels) kernels ;;
    wheel) wheel ;;
    *) echo "usage: $0 kernels|wheel" >&2; exit 2 ;;
esac
