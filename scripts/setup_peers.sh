#!/usr/bin/env bash
# The peers sli's benchmarks compare against, each in an environment of its own under
# $SLI_HOME/peers (none of them is an sli dependency; sli's own venv is never touched):
#
#   llama          llama.cpp from the source llama-cpp-python's sdist vendors, built three ways
#                  (-march=native, AVX-512 explicit, AVX2), each checked on the real model
#                  (greedy completion, perplexity) and timed (llama-bench, on the real model and
#                  the 1B Q4_0, which this part makes first: see model-1b); the fastest that runs
#                  correctly becomes llama.cpp/best (best.json says how it was chosen)
#   venv-bench     a venv with sli (editable, locked deps), the llama-cpp-python binding pointed at
#                  llama.cpp/best (LLAMA_CPP_LIB_PATH) and the converter's requirements
#   model-1b       the random model in Llama-3.2-1B's shapes and llama.cpp's own Q4_0 of it, where
#                  `sli bench --scale 1b` looks for them (needs one llama.cpp build)
#   llama-rpc      llama.cpp once more from the same source with its RPC backend (ggml-rpc-server,
#                  llama-bench, llama-batched-bench), AVX2 flags, into llama.cpp/rpc-avx2: the
#                  pipeline benchmark's peer (scripts/peers/llama_rpc.py drives it)
#   llmcompressor  venv-llmcompressor: llm-compressor on the CPU torch (GPTQ, AWQ)
#   airllm         AirLLM in venv-bench (it keeps sli's transformers and torch), checked on the real model
#   lmeval         lm-eval-harness (local-completions) in venv-bench
#
#   scripts/setup_peers.sh                 # everything
#   scripts/setup_peers.sh llama model-1b  # only these parts
#   scripts/setup_peers.sh llama-rpc       # the RPC build (only when named: not part of "everything")
#
# Idempotent: a part whose result exists is skipped (FORCE=1 redoes it). At the end it writes
# $SLI_HOME/peers/peers.json (paths and versions) and prints it. JOBS (default 2) compiles.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SLI_HOME=${SLI_HOME:-$HOME/.cache/sli}
PEERS=$SLI_HOME/peers
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}
FORCE=${FORCE:-0}
LOCK=$REPO/requirements.lock
LLAMA_CPP_PY_VERSION=0.3.36
TORCH_VERSION=2.13.0
LLMCOMPRESSOR_SPEC=${LLMCOMPRESSOR_SPEC:-"llmcompressor>=0.14,<0.15"}
AIRLLM_VERSION=4.0.0
LMEVAL_SPEC=${LMEVAL_SPEC:-"lm-eval[api]>=0.4,<0.5"}
SRC=$PEERS/src/llama_cpp_python-$LLAMA_CPP_PY_VERSION
LLAMA_SRC=$SRC/vendor/llama.cpp
BENCH_VENV=$PEERS/venv-bench
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'setup_peers: %s\n' "$*" >&2; exit 1; }
mkdir -p "$PEERS"

# -- llama.cpp ---------------------------------------------------------------------------------
llama_source() {
    [ -f "$LLAMA_SRC/convert_hf_to_gguf.py" ] && return 0
    say "llama-cpp-python $LLAMA_CPP_PY_VERSION sdist (vendors llama.cpp) -> $PEERS/src"
    mkdir -p "$PEERS/src"
    "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_PY_VERSION" -d "$PEERS/src"
    tar -xzf "$PEERS/src/llama_cpp_python-$LLAMA_CPP_PY_VERSION.tar.gz" -C "$PEERS/src"
    [ -f "$LLAMA_SRC/convert_hf_to_gguf.py" ] || die "the sdist holds no vendor/llama.cpp"
}

need_tools() {
    local missing=()
    for t in cmake ninja g++ ccache; do command -v "$t" >/dev/null || missing+=("$t"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing build tools: ${missing[*]}"
    local pkgs=(); for t in "${missing[@]}"; do case $t in g++) pkgs+=(build-essential);; ninja) pkgs+=(ninja-build);; *) pkgs+=("$t");; esac; done
    apt-get install -y "${pkgs[@]}" >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y "${pkgs[@]}" >/dev/null; } \
        || die "could not install ${pkgs[*]} (apt-get); install them and rerun"
}

# Shared libraries on (the Python binding loads libllama.so); the server's web UI neither
# built nor downloaded; no tests or examples. Binaries and libraries land in <dir>/bin.
LLAMA_COMMON=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_CCACHE=ON
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_OPENMP=ON)
LLAMA_TARGETS=(llama ggml llama-server llama-quantize llama-bench llama-cli llama-completion llama-perplexity)
X86_OFF=(-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
    -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
declare -A LLAMA_FLAGS=(
    [native]="-DGGML_NATIVE=ON"
    [avx512]="-DGGML_NATIVE=OFF ${X86_OFF[*]} -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
    [avx2]="-DGGML_NATIVE=OFF ${X86_OFF[*]} -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
)
LLAMA_ISAS=(native avx512 avx2)

llama_build() {  # one ISA into $PEERS/llama.cpp/<isa>; a failed build is recorded, not fatal
    local isa=$1 dir=$PEERS/llama.cpp/$1 flags=${LLAMA_FLAGS[$1]}
    if [ "$FORCE" != 1 ] && [ -f "$dir/.built" ] && [ "$(cat "$dir/.built")" = "$flags" ]; then
        echo "llama.cpp/$isa: built" >&2; return 0
    fi
    say "building llama.cpp/$isa ($flags), -j$JOBS; log: $dir/build.log"
    mkdir -p "$dir"; rm -f "$dir/.built" "$dir/.failed"
    # shellcheck disable=SC2086
    if CCACHE_BASEDIR=$PEERS CCACHE_DIR=$PEERS/ccache \
        cmake -S "$LLAMA_SRC" -B "$dir" "${LLAMA_COMMON[@]}" $flags >"$dir/build.log" 2>&1 &&
        CCACHE_BASEDIR=$PEERS CCACHE_DIR=$PEERS/ccache \
        cmake --build "$dir" -j "$JOBS" --target "${LLAMA_TARGETS[@]}" >>"$dir/build.log" 2>&1; then
        echo "$flags" >"$dir/.built"
    else
        echo "build failed, see $dir/build.log" >"$dir/.failed"; tail -5 "$dir/build.log" >&2
    fi
}

part_llama() {
    need_tools
    llama_source
    for isa in "${LLAMA_ISAS[@]}"; do llama_build "$isa"; done
    part_model_1b  # the speed rounds run on it too
    # each build on the real model (greedy completion, perplexity) and on both models' speed
    # (llama-bench); the fastest that runs correctly becomes llama.cpp/best
    local gguf; gguf=$(gguf_real)
    if [ "$FORCE" = 1 ] || [ ! -f "$PEERS/llama.cpp/best.json" ]; then
        say "checking each build on $gguf and $GGUF_1B (tens of minutes)"
        "$PYTHON" "$REPO/scripts/peers/llama_pick.py" --peers "$PEERS" --gguf "$gguf" --speed-gguf "$GGUF_1B" \
            --isas "${LLAMA_ISAS[@]}" --reference-python "$(sli_python)" --model "$SLI_HOME/models/SmolLM2-135M-Instruct"
    fi
    [ -e "$PEERS/llama.cpp/best/bin/llama-server" ] || die "no llama.cpp build runs here (see $PEERS/llama.cpp/best.json)"
}

# sli's own python (SLI_PYTHON, or the repo's .venv that `make setup` builds): the reference
# greedy text, the random 1B model
sli_python() {
    for p in "${SLI_PYTHON:-}" "$REPO/.venv/bin/python"; do
        [ -n "$p" ] && [ -x "$p" ] && "$p" -c "import sli" 2>/dev/null && { echo "$p"; return; }
    done
    die "no python with sli installed: run \`make setup\` first (or set SLI_PYTHON)"
}

gguf_real() {  # the real model's Q4_1 GGUF (fetched by `sli fetch-model`)
    local py; py=$(sli_python)
    "$py" -m sli.cli fetch-model --gguf | tail -1
}

# -- llama.cpp with RPC: the pipeline benchmark's peer ------------------------------------------------
# One build, AVX2 flags (the native and AVX-512 builds of this version have crashed on this host),
# the RPC backend on. This version names the server target ggml-rpc-server (tools/rpc), and its
# llama-cli is a chat client built on the server's code: llama-completion is the plain completion
# tool, and llama-batched-bench times several sequences decoding together. Compiled under
# nice -n 19: the host is shared.
LLAMA_RPC_DIR=$PEERS/llama.cpp/rpc-avx2
LLAMA_RPC_TARGETS=(ggml-rpc-server llama-bench llama-batched-bench llama-quantize llama-completion)
part_llama_rpc() {
    need_tools
    llama_source
    local flags="-DGGML_RPC=ON ${LLAMA_FLAGS[avx2]}" dir=$LLAMA_RPC_DIR
    if [ "$FORCE" != 1 ] && [ -f "$dir/.built" ] && [ "$(cat "$dir/.built")" = "$flags" ]; then
        echo "llama.cpp/rpc-avx2: built" >&2; return 0
    fi
    say "building llama.cpp/rpc-avx2 ($flags), nice -n 19 -j$JOBS; log: $dir/build.log"
    mkdir -p "$dir"; rm -f "$dir/.built" "$dir/.failed"
    # shellcheck disable=SC2086
    if CCACHE_BASEDIR=$PEERS CCACHE_DIR=$PEERS/ccache \
        cmake -S "$LLAMA_SRC" -B "$dir" "${LLAMA_COMMON[@]}" $flags >"$dir/build.log" 2>&1 &&
        CCACHE_BASEDIR=$PEERS CCACHE_DIR=$PEERS/ccache \
        nice -n 19 cmake --build "$dir" -j "$JOBS" --target "${LLAMA_RPC_TARGETS[@]}" >>"$dir/build.log" 2>&1; then
        echo "$flags" >"$dir/.built"
    else
        echo "build failed, see $dir/build.log" >"$dir/.failed"; tail -20 "$dir/build.log" >&2
        die "the llama.cpp RPC build failed (log: $dir/build.log)"
    fi
}

# -- venv-bench: sli + the binding on llama.cpp/best + the converter ------------------------------
venv_bench_install() {  # everything but the check, which needs llama.cpp/best
    local py=$BENCH_VENV/bin/python
    if [ ! -x "$py" ]; then say "venv-bench"; "$PYTHON" -m venv "$BENCH_VENV"; fi
    "$py" -c "import torch" 2>/dev/null || PIP_CONSTRAINT=$LOCK "$py" -m pip install --quiet "torch==$TORCH_VERSION"
    "$py" -c "import sli, matplotlib" 2>/dev/null || PIP_CONSTRAINT=$LOCK "$py" -m pip install --quiet -e "$REPO[dev,bench]"
    if ! "$py" -c "import llama_cpp" 2>/dev/null; then
        # only the Python side: LLAMA_BUILD=OFF compiles nothing; the library comes from
        # LLAMA_CPP_LIB_PATH=llama.cpp/best/bin at run time
        say "llama-cpp-python $LLAMA_CPP_PY_VERSION (Python side only, on llama.cpp/best)"
        CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" PIP_CONSTRAINT=$LOCK "$py" -m pip install --quiet "$SRC"
    fi
    # the converter's own requirements beyond sli's (it imports sentencepiece at start-up; gguf-py,
    # numpy, torch and transformers are sli's)
    "$py" -c "import sentencepiece, google.protobuf" 2>/dev/null || PIP_CONSTRAINT=$LOCK \
        "$py" -m pip install --quiet "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21.0,<5.0.0"
}

part_venv_bench() {
    llama_source
    venv_bench_install
    [ -e "$PEERS/llama.cpp/best/bin/libllama.so" ] || part_llama
    say "checking the binding loads llama.cpp/best"
    LLAMA_CPP_LIB_PATH=$PEERS/llama.cpp/best/bin "$BENCH_VENV/bin/python" "$REPO/scripts/peers/binding_check.py" "$(gguf_real)"
}

# -- the 1B-shape model and its Q4_0 ----------------------------------------------------------------
# Where `sli bench --scale 1b` looks (sli/bench_scale.py run_scale), made as it would make them:
# sli's random model in Llama-3.2-1B's shapes with the real tokenizer, then llama.cpp's own
# pipeline: its converter to a bf16 GGUF (in venv-bench: it imports sentencepiece, which sli's
# venv lacks), then llama-quantize Q4_0 (the reference quantizer: the same bytes from every build).
MODEL_1B=$SLI_HOME/scale-1b/llama-1b-shape
GGUF_1B=$SLI_HOME/scale-1b/llama-1b-q4_0.gguf
part_model_1b() {
    local py; py=$(sli_python)
    llama_source
    if [ ! -f "$MODEL_1B/model.safetensors.index.json" ]; then
        say "the random model in Llama-3.2-1B's shapes -> $MODEL_1B"
        "$py" "$REPO/scripts/make_synthetic_model.py" "$MODEL_1B" --shape 1b --vocab 49152 \
            --tokenizer-from "$SLI_HOME/models/SmolLM2-135M-Instruct"
    fi
    if [ ! -f "$GGUF_1B" ]; then
        local quantize=""
        for isa in best "${LLAMA_ISAS[@]}" rpc-avx2; do  # the RPC build's quantizer too: same source
            [ -x "$PEERS/llama.cpp/$isa/bin/llama-quantize" ] && { quantize=$PEERS/llama.cpp/$isa/bin/llama-quantize; break; }
        done
        [ -n "$quantize" ] || die "no llama-quantize: run \`scripts/setup_peers.sh llama\` (or llama-rpc) first"
        say "llama.cpp's Q4_0 of it: convert_hf_to_gguf.py (bf16, in venv-bench), then $quantize Q4_0"
        venv_bench_install
        local bf16=$SLI_HOME/scale-1b/llama-1b-shape.bf16.gguf
        PYTHONPATH=$LLAMA_SRC/gguf-py "$BENCH_VENV/bin/python" "$LLAMA_SRC/convert_hf_to_gguf.py" "$MODEL_1B" \
            --outtype bf16 --outfile "$bf16"
        "$quantize" "$bf16" "$GGUF_1B.part" Q4_0 "$JOBS"
        mv "$GGUF_1B.part" "$GGUF_1B"; rm -f "$bf16"
    fi
    echo "$GGUF_1B: $(stat -c %s "$GGUF_1B") bytes" >&2
}

# -- llm-compressor ---------------------------------------------------------------------------------
part_llmcompressor() {
    local venv=$PEERS/venv-llmcompressor py=$PEERS/venv-llmcompressor/bin/python
    [ -x "$py" ] || { say "venv-llmcompressor"; "$PYTHON" -m venv "$venv"; }
    "$py" -c "import torch" 2>/dev/null || "$py" -m pip install --quiet "torch==$TORCH_VERSION"
    if ! "$py" -c "import llmcompressor" 2>/dev/null; then
        say "$LLMCOMPRESSOR_SPEC (CPU torch $TORCH_VERSION kept)"
        # the torch installed above stays: a constraint keeps pip from swapping in a CUDA build
        echo "torch==$TORCH_VERSION" >"$venv/constraints.txt"
        PIP_CONSTRAINT=$venv/constraints.txt "$py" -m pip install --quiet "$LLMCOMPRESSOR_SPEC"
    fi
}

# -- AirLLM -----------------------------------------------------------------------------------------
# AirLLM 4.0.0 asks for transformers>=4.49,<6 and torch>=2.4: it installs into venv-bench beside
# sli's locked versions (nothing changes) and runs there, where `sli bench` imports it. Checked
# once on the real model: its greedy tokens against transformers' (airllm-status.json).
part_airllm() {
    [ -x "$BENCH_VENV/bin/python" ] || part_venv_bench
    local py=$BENCH_VENV/bin/python
    "$py" -c "import airllm" 2>/dev/null ||
        { say "airllm $AIRLLM_VERSION into venv-bench"; PIP_CONSTRAINT=$LOCK "$py" -m pip install --quiet "airllm==$AIRLLM_VERSION"; }
    if [ "$FORCE" = 1 ] || [ ! -f "$PEERS/airllm-status.json" ]; then
        say "AirLLM on the real model (layer by layer on the CPU; minutes)"
        "$py" "$REPO/scripts/peers/airllm_probe.py" "$SLI_HOME/models/SmolLM2-135M-Instruct" --new-tokens 3 2>"$PEERS/airllm-probe.log" |
            tail -1 >"$PEERS/airllm-status.json" || echo "setup_peers: AirLLM failed its check: $PEERS/airllm-status.json" >&2
    fi
}

# -- lm-eval ----------------------------------------------------------------------------------------
part_lmeval() {
    [ -x "$BENCH_VENV/bin/python" ] || part_venv_bench
    "$BENCH_VENV/bin/python" -c "import lm_eval, tenacity" 2>/dev/null ||
        { say "$LMEVAL_SPEC into venv-bench"; PIP_CONSTRAINT=$LOCK "$BENCH_VENV/bin/python" -m pip install --quiet "$LMEVAL_SPEC"; }
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(llama venv-bench model-1b llmcompressor airllm lmeval)
for p in "${parts[@]}"; do
    case $p in
        llama) part_llama ;;
        venv-bench) part_venv_bench ;;
        model-1b) part_model_1b ;;
        llama-rpc) part_llama_rpc ;;
        llmcompressor) part_llmcompressor ;;
        airllm) part_airllm ;;
        lmeval) part_lmeval ;;
        *) die "unknown part '$p' (llama, venv-bench, model-1b, llama-rpc, llmcompressor, airllm, lmeval)" ;;
    esac
done
"$PYTHON" "$REPO/scripts/peers/write_peers_json.py" --peers "$PEERS" --sli-home "$SLI_HOME" --llama-src "$LLAMA_SRC"
