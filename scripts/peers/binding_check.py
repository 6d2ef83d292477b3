#!/usr/bin/env python3
"""The llama-cpp-python binding in venv-bench loads OUR llama.cpp (LLAMA_CPP_LIB_PATH) and
decodes the real model greedily, with repacking on and off, as `sli bench --scale` drives it.

    LLAMA_CPP_LIB_PATH=$SLI_HOME/peers/llama.cpp/best/bin $SLI_HOME/peers/venv-bench/bin/python \
        scripts/peers/binding_check.py $SLI_HOME/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf

It fails (exit 1) when the library loaded is not the one the variable names, or when the
binding's greedy tokens differ from llama-completion's on the same build (best.json).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    lib_dir = os.environ.get("LLAMA_CPP_LIB_PATH")
    if not lib_dir:
        raise SystemExit("set LLAMA_CPP_LIB_PATH to a llama.cpp build's bin folder (libllama.so)")
    import llama_cpp
    from llama_cpp import Llama

    loaded = Path(llama_cpp.llama_cpp._lib._name).resolve()
    want = (Path(lib_dir) / "libllama.so").resolve()
    print(f"llama_cpp {llama_cpp.__version__} loaded {loaded}")
    print("system info:", llama_cpp.llama_print_system_info().decode().strip())
    if loaded != want:
        raise SystemExit(f"the binding loaded {loaded}, not {want}")
    gguf = sys.argv[1]
    best = json.loads((Path(lib_dir).resolve().parents[1] / "best.json").read_text())
    prompt, n = best["prompt"], 24
    texts = {}
    for repack in (True, False):
        default = llama_cpp.llama_cpp.llama_model_default_params

        def params(default=default, repack=repack):
            p = default()
            p.use_extra_bufts = repack
            return p

        llama_cpp.llama_cpp.llama_model_default_params = params
        llm = Llama(model_path=gguf, n_ctx=256, n_threads=min(os.cpu_count() or 2, 2), n_batch=256, verbose=False)
        llama_cpp.llama_cpp.llama_model_default_params = default
        ids = llm.tokenize(prompt.encode(), add_bos=True)
        llm.eval(ids)
        toks = []
        for _ in range(n):
            toks.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if llm.token_eos() == toks[-1]:
                break
            llm.eval([toks[-1]])
        texts[repack] = llm.detokenize(toks).decode(errors="replace")
        print(f"greedy (repack {'on' if repack else 'off'}): {texts[repack]!r}")
        del llm
    cli = best["builds"][best["best"]]["greedy"]
    if texts[True].strip() != cli.strip():
        raise SystemExit(f"the binding's greedy text differs from llama-completion's: {cli!r}")
    print("binding OK: our library, same greedy text as llama-completion")


if __name__ == "__main__":
    main()
