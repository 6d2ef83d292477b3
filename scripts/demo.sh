#!/usr/bin/env bash
# The demo's whole pipeline, run by `make demo` and, as it is, by tests/test_demo.py:
# quantize the real model to int8 (LLM.int8; round-to-nearest int4 costs this model ~22%
# perplexity and its greedy answer), check every record, then answer a question inside a
# 64 MB budget in bf16.
# Usage: scripts/demo.sh CACHE_DIR   (SLI: the sli executable, default `sli` on PATH)
set -euo pipefail
SLI=${SLI:-sli}
CACHE=${1:?usage: scripts/demo.sh CACHE_DIR}
"$SLI" quantize SmolLM2-135M-Instruct --mode int8 --cache "$CACHE" --validate-memory
"$SLI" inspect "$CACHE" --verify
"$SLI" generate "$CACHE" --dtype bfloat16 --memory-budget 64MB --max-new-tokens 32 \
    --prompt "Question: What is the capital of France? Answer:"
