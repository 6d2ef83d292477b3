"""End to end, before and after the rows path: the first token of a long prompt (prefill) and
decode tokens/s of 1, 4, 16 sequences in one batch, in RAM, on an int4 cache.

Both models are opened in one process and measured alternately (best of ``--repeats``), so a
shared host's load falls on both alike: ``packed`` is the packed int4 kernel for every row
count (``rows_kernel=False``), ``rows`` the kernel chosen by rows (the default).

    python scripts/measure_rows_e2e.py CACHE [--prompt-tokens 512] [--batches 1,4,16] [--prefill-chunks 128,512]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache import LayerStore  # noqa: E402
from runtime.executor import StreamingModel  # noqa: E402
from runtime.generate import GenerationOutput, SamplingConfig, generate  # noqa: E402


def _ttft(m: StreamingModel, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    generate(m, ids, SamplingConfig(max_new_tokens=1))
    return time.perf_counter() - t0


def _batch(m: StreamingModel, ids: torch.Tensor, new: int) -> dict:
    out: GenerationOutput = generate(m, ids, SamplingConfig(max_new_tokens=new))
    return {"ttft_s": out.stats.time_to_first_token_s, "decode_tok_s": out.stats.decode_tokens_per_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache")
    ap.add_argument("--variant", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--batch-prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prefill-chunks", default="128,512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 gives steadier ratios on a host shared with other work")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res: dict = {"cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                              if ln.startswith("model name")), "?"),
                 "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "capability": torch.backends.cpu.get_cpu_capability(), "points": []}
    gen = torch.Generator().manual_seed(0)
    with LayerStore(a.cache, readonly=True) as st:
        vid = a.variant or st.list_variants()[0]
        vocab = st.require_manifest(vid).config["vocab_size"]
        for chunk in [int(c) for c in a.prefill_chunks.split(",")]:
            models = {}
            for name, rk in (("packed", False), ("rows", None)):
                models[name] = StreamingModel(st, vid, memory_budget=1 << 40, dtype=torch.bfloat16, context_tokens=2048,
                                              prefill_chunk=chunk, rows_kernel=rk)
            res["rows_reason"] = models["rows"].rows_reason
            res["crossover"] = models["rows"].rows_kernel.table.rows if models["rows"].rows_kernel.table else None
            ids = torch.randint(100, vocab - 100, (1, a.prompt_tokens), generator=gen)
            best = {n: min(_ttft(m, ids) for _ in range(a.repeats)) for n, m in models.items()}
            res["points"].append({"what": f"first token, {a.prompt_tokens}-token prompt", "prefill_chunk": chunk, **best,
                                  "speedup": best["packed"] / best["rows"]})
            print(json.dumps(res["points"][-1]), flush=True)
            if chunk == int(a.prefill_chunks.split(",")[0]):
                for b in [int(x) for x in a.batches.split(",")]:
                    ids = torch.randint(100, vocab - 100, (b, a.batch_prompt_tokens), generator=gen)
                    runs = {n: [_batch(m, ids, a.new_tokens) for _ in range(a.repeats)] for n, m in models.items()}
                    pt = {"what": f"batch of {b}, {a.batch_prompt_tokens}-token prompts, {a.new_tokens} new", "batch": b,
                          "prefill_chunk": chunk}
                    for n, rs in runs.items():
                        pt[f"{n} decode tok/s"] = max(r["decode_tok_s"] for r in rs)
                        pt[f"{n} ttft s"] = min(r["ttft_s"] for r in rs)
                    res["points"].append(pt)
                    print(json.dumps(pt), flush=True)
            for n, m in models.items():
                res.setdefault("calls", {})[f"{n} chunk {chunk}"] = dict(m.rows_kernel.calls)
                m.close()
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "points"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
