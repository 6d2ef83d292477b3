"""int8 KV blocks against KV in the compute dtype, on the real model: sliding-window perplexity
with every window's KV going through the paged pool (so attention reads the KV as it is
stored), and how many tokens the same KV memory holds. Writes docs/results/kv_int8.md.

    python scripts/measure_kv_int8.py [--tokens 2048] [--out docs/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from runtime.evaluate import default_text, paged_perplexity
from runtime.kv import KVDtype, pool_for
from sli.offline.fetch import fetch_model, sli_home
from sli.processor import UniversalSLIProcessor

PLANS = [("none", "float32"), ("none", "bfloat16"), ("int4", "bfloat16")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--cache", default=str(sli_home() / "cache"))
    a = ap.parse_args()
    rows = []
    for mode, dtype in PLANS:
        p = UniversalSLIProcessor(fetch_model(), quantization_config=mode, cache_dir=a.cache, dtype=dtype, context_tokens=1024,
                                  progress=False)
        m = p.load()
        ids = torch.tensor(p.tokenizer(default_text())["input_ids"][: a.tokens])
        res = {}
        for kv in KVDtype:
            pool = pool_for(m, kv_dtype=kv)
            t0 = time.perf_counter()
            r = paged_perplexity(m, ids, pool, max_length=a.max_length)
            res[kv.value] = {"perplexity": r.perplexity, "tokens": r.tokens_scored, "seconds": time.perf_counter() - t0,
                             "blocks": pool.num_blocks, "pool_bytes": pool.bytes}
            print(mode, dtype, kv.value, res[kv.value], flush=True)
        rows.append({"mode": mode, "dtype": dtype, **res})
        p.close()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_int8.json").write_text(json.dumps(rows, indent=1))
    lines = ["# int8 KV blocks against KV in the compute dtype (SmolLM2-135M-Instruct)", "",
             f"Sliding-window perplexity (windows of {a.max_length}, stride {a.max_length // 2}) on the first {a.tokens} tokens of "
             "Python's pydoc topics (no calibration is involved: any text is held out), every window's KV written to and read "
             "from the paged pool (int8: per-token, per-head absmax scales in fp16). The pool is the KV memory the budget "
             "reserves for 1024 tokens in the compute dtype. `python scripts/measure_kv_int8.py`.", "",
             "| plan | compute | ppl, KV in the compute dtype | ppl, int8 KV | change | tokens the same memory holds (compute dtype / int8) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fp, q = r["auto"], r["int8"]
        lines.append(f"| {r['mode']} | {r['dtype']} | {fp['perplexity']:.4f} | {q['perplexity']:.4f} | "
                     f"{100 * (q['perplexity'] / fp['perplexity'] - 1):+.3f}% | {fp['blocks'] * 16} / {q['blocks'] * 16} "
                     f"({q['blocks'] / fp['blocks']:.2f}x) |")
    (out / "kv_int8.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
