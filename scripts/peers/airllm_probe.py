#!/usr/bin/env python3
"""AirLLM's layer-by-layer generation on the CPU, called as `sli bench` calls it (sli/bench.py,
the "airllm" point), checked against transformers' greedy tokens on the same weights and dtype.
Runs in the environment that holds AirLLM (venv-bench, by ``scripts/setup_peers.sh airllm``):

    $SLI_HOME/peers/venv-bench/bin/python scripts/peers/airllm_probe.py ~/.cache/sli/models/SmolLM2-135M-Instruct

Prints a JSON line (versions, tokens, times, whether they match) and exits 1 when AirLLM fails
or its tokens differ from transformers'.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import traceback


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--prompt", default="The history of computing is a story of machines that")
    a = ap.parse_args()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    ids = tok(a.prompt, return_tensors="pt").input_ids
    res: dict = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    ref_model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        ref = ref_model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
    res["transformers_bf16"] = ref[0, ids.shape[1]:].tolist()
    del ref_model
    shards = tempfile.mkdtemp(prefix="airllm-probe-")
    try:
        import airllm
        from airllm import AutoModel

        res["versions"]["airllm"] = getattr(airllm, "__version__", None) or __import__("importlib.metadata").metadata.version("airllm")
        t0 = time.perf_counter()
        model = AutoModel.from_pretrained(a.model, device="cpu", layer_shards_saving_path=shards)
        res["load_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
        res["generate_s"] = round(time.perf_counter() - t0, 2)
        seq = out.sequences if hasattr(out, "sequences") else out
        res["airllm"] = seq[0, ids.shape[1]:].tolist()
        res["text"] = tok.decode(res["airllm"])
        res["tokens_equal"] = res["airllm"] == res["transformers_bf16"]
    except Exception as e:  # report what failed and how, then exit 1
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-3000:]
    finally:
        shutil.rmtree(shards, ignore_errors=True)
    print(json.dumps(res))
    raise SystemExit(0 if res.get("tokens_equal") else 1)


if __name__ == "__main__":
    main()
