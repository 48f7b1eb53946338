#!/usr/bin/env bash
# The prebuilt wheels, and what a user without a Rust toolchain gets from them.
#
#   bash ci/wheels.sh build   # dist/: the abi3 wheel (Python >= 3.10) for manylinux2014
#                             # x86_64 and aarch64 (cross-linked with zig), and the pure
#                             # Python kernels wheel
#   bash ci/wheels.sh check   # the x86_64 wheels in a fresh virtual environment with no
#                             # Rust on PATH: --help, a served chat answer through the
#                             # official openai client, an SDK script
#
# Nothing is compiled for this machine's CPU: no target-cpu flags, the x86_64 code is
# baseline x86-64 and picks AVX2 / AVX-512 kernels at run time (MISTRALRS_SERVE_CPU_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DIST=dist
TARGETS=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mistralrs-serve/cargo-target}"

build() {
    unset RUSTFLAGS CARGO_BUILD_RUSTFLAGS
    if grep -rqs "target-cpu" .cargo Cargo.toml native/*/Cargo.toml; then
        echo "a target-cpu flag is set: wheels must run on baseline CPUs" >&2
        exit 1
    fi
    $BIN/pip install -q -c constraints.txt ziglang
    for target in "${TARGETS[@]}"; do
        rustup target list --installed | grep -qx "$target" || rustup target add "$target"
    done
    rm -rf "$DIST" && mkdir -p "$DIST"
    for target in "${TARGETS[@]}"; do
        # maturin runs zig as `python3 -m ziglang` from PATH
        PATH="$(realpath .venv)/bin:$PATH" VIRTUAL_ENV=$(realpath .venv) $BIN/maturin build --release --zig \
            --compatibility manylinux2014 \
            --target "$target" --out "$DIST" -q
    done
    $BIN/pip wheel -q --no-deps --no-build-isolation -w "$DIST" ./kernels
    ls -l "$DIST"
}

check() {
    local venv server_log port pid
    venv=$(mktemp -d)/venv
    server_log=$(mktemp)
    python3 -m venv "$venv"
    # only the interpreter's and the system's directories: no cargo, no rustc
    local path="$venv/bin:/usr/local/bin:/usr/bin:/bin"
    if env PATH="$path" sh -c 'command -v cargo || command -v rustc' >/dev/null; then
        echo "a Rust toolchain is on the check's PATH" >&2
        exit 1
    fi
    env PATH="$path" "$venv/bin/pip" install -q -c constraints.txt \
        "$DIST"/mistralrs_serve-*manylinux*x86_64.whl "$DIST"/mistralrs_serve_kernels-*.whl openai
    env PATH="$path" "$venv/bin/mistralrs-serve" --help >/dev/null
    port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    (cd / && env PATH="$path" "$venv/bin/mistralrs-serve" serve -p "$port" >"$server_log" 2>&1) &
    pid=$!
    # the venv holds gigabytes (torch): gone however the check ends
    trap 'kill $pid 2>/dev/null || true; rm -rf "$(dirname "$venv")" "$server_log"' RETURN
    (cd / && env PATH="$path" "$venv/bin/python" - "$port" <<'EOF'
import sys, time, httpx, openai
base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(600):
    try:
        if httpx.get(base + "/health", timeout=2).status_code == 200:
            break
    except httpx.TransportError:
        pass
    time.sleep(0.5)
client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
answer = client.chat.completions.create(
    model="default", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
)
assert answer.choices[0].message.content, answer
print("wheel server answered:", repr(answer.choices[0].message.content))
EOF
    ) || { cat "$server_log"; exit 1; }
    (cd / && env PATH="$path" "$venv/bin/python" - <<'EOF'
import mistralrs_serve
from mistralrs_serve import ChatCompletionRequest, Runner, Which, _native
runner = Runner(which=Which.Default())
res = runner.send_chat_completion_request(
    ChatCompletionRequest(model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
)
assert res.choices[0].message.content is not None
print("wheel SDK answered on the", _native.QuantMatrix.kernel_path(), "path from", mistralrs_serve.__file__)
EOF
    )
}

case "${1:-}" in
build) build ;;
check) check ;;
*)
    echo "usage: $0 build|check" >&2
    exit 2
    ;;
esac
