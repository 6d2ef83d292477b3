"""Speculative decoding on the real model streamed below its own size: plain decoding against
prompt lookup (and a resident draft with ``--draft``) in the same run, on three kinds of
prompts (input-grounded: quote/summarize a given text, edit given code; open chat; a long chat
with history), and the time of one pass of 1, 2, 4, 8, 16 rows while streaming.

With ``--limit`` the measurement runs in a child memory cgroup of that limit (anonymous memory
and page cache together) after the cache's files are dropped from the page cache, so each pass
reads the streamed layers from disk; without it the page cache is as the host left it.

    python scripts/measure_speculative.py [--mode none] [--dtype float32] [--budget 200MB] [--limit 400MiB]
        [--new-tokens 64] [--draft int4] [--out docs/results]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPTS = {
    "grounded: quote": "Here is a text:\n\n{text}\n\nQuote the text's first two sentences exactly, then summarize it in one sentence.",
    "grounded: code edit": "Rename the method `allocate` to `take` and the variable `idx` to `slot` in this code; "
                           "reply with the whole edited code only.\n\n```python\n{code}\n```",
    "open chat": "What are three good habits for learning a new programming language? Explain each briefly.",
}
HISTORY = [
    ("user", "I am planning a trip to Lisbon in spring. What should I see?"),
    ("assistant", "Lisbon in spring is lovely. See the Alfama district, the Belem Tower, the Jeronimos Monastery, "
                  "ride tram 28, and watch the sunset from a miradouro such as Senhora do Monte."),
    ("user", "How many days do I need for those?"),
    ("assistant", "Three days are enough: one for Alfama and tram 28, one for Belem Tower and the Jeronimos Monastery, "
                  "and one for the miradouros and a day trip to Sintra if you like."),
    ("user", "Repeat the plan for the three days as a list, then add one restaurant tip per day."),
]


def _messages(tok) -> dict[str, list[int]]:
    from runtime.evaluate import default_text
    from runtime.kv import BlockPool

    text = default_text()[2000:3200]
    code = inspect.getsource(BlockPool.allocate)
    out = {}
    for name, p in PROMPTS.items():
        msgs = [{"role": "user", "content": p.format(text=text, code=code)}]
        out[name] = _template(tok, msgs)
    out["long chat"] = _template(tok, [{"role": r, "content": c} for r, c in HISTORY])
    return out


def _template(tok, msgs) -> list[int]:
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def pass_times(model, rows_list=(1, 2, 4, 8, 16), *, context: int = 64, repeats: int = 5) -> dict[int, float]:
    """Median seconds of one forward pass of ``rows`` new tokens after ``context`` cached ones."""
    from transformers import DynamicCache

    from runtime.generate import prefill

    ids = torch.randint(100, 10000, (1, context + max(rows_list)), generator=torch.Generator().manual_seed(0))
    _, cache = prefill(model, ids[:, :context], cache=DynamicCache(config=model.config))
    times: dict[int, list[float]] = {r: [] for r in rows_list}
    for _ in range(repeats):  # row counts interleaved, so a busy spell of a shared host hits them all
        for rows in rows_list:
            t = time.perf_counter()
            model.forward(ids[:, context : context + rows], cache=cache, use_cache=True, logits_to_keep=rows)
            times[rows].append(time.perf_counter() - t)
            cache.crop(-rows)
    return {r: statistics.median(t) for r, t in times.items()}


def child(a) -> dict:
    from sli.offline.fetch import fetch_model
    from sli.processor import UniversalSLIProcessor

    proc = UniversalSLIProcessor(fetch_model(), quantization_config=a.mode, cache_dir=a.cache, dtype=a.dtype,
                                 memory_budget=a.budget, context_tokens=2048, page_cache=None, progress=False)
    model = proc.load()
    res = {"plan": model.plan.describe(), "mode": a.mode, "dtype": a.dtype, "budget": a.budget, "limit": a.limit,
           "new_tokens": a.new_tokens, "prompts": {}}
    methods = [("plain", {}), ("lookup", {"speculative": "lookup"})]
    if a.draft:
        methods.append((f"draft {a.draft}", {"speculative": "draft", "draft": a.draft}))
        proc._draft(a.draft).load()  # opened (and built) before the timings
    for name, ids in _messages(proc.tokenizer).items():
        row = {"prompt_tokens": len(ids)}
        for label, kw in methods:
            r = proc.generate(ids, max_new_tokens=a.new_tokens, prefix_cache=False, **kw)
            s = r.stats
            row[label] = {"tok_s": s.decode_tokens_per_s, "tokens_per_pass": s.tokens_per_pass, "acceptance": s.acceptance,
                          "new_tokens": s.new_tokens, "same_tokens": r.token_ids == row.get("plain", {}).get("ids", r.token_ids),
                          "ids": r.token_ids, "mib_per_token": s.bytes_read_per_token / 2**20}
        res["prompts"][name] = row
    res["pass_seconds"] = pass_times(model)
    res["mib_per_pass"] = model.plan.bytes_read_per_pass / 2**20
    proc.close()
    return res


def markdown(res: dict) -> str:
    methods = [k for k in next(iter(res["prompts"].values())) if k != "prompt_tokens"]
    lines = [f"Mode {res['mode']} ({res['dtype']}), budget {res['budget']}, cgroup limit {res['limit'] or 'none'}, "
             f"{res['new_tokens']} new tokens, greedy. Plan: {res['plan']}", "",
             "| prompt | tokens | " + " | ".join(f"{m} tok/s" for m in methods) + " | "
             + " | ".join(f"{m}: tokens/pass, kept, speed-up, same tokens" for m in methods[1:]) + " |",
             "|---" * (2 + len(methods) + len(methods) - 1) + "|"]
    for name, row in res["prompts"].items():
        base = row["plain"]["tok_s"]
        cells = [f"{row[m]['tok_s']:.2f}" for m in methods]
        spec = [f"{row[m]['tokens_per_pass']:.2f}, {row[m]['acceptance']:.0%}, {row[m]['tok_s'] / base:.2f}x, "
                f"{'yes' if row[m]['same_tokens'] else 'NO'}" for m in methods[1:]]
        lines.append(f"| {name} | {row['prompt_tokens']} | " + " | ".join(cells + spec) + " |")
    ps = res["pass_seconds"]
    lines += ["", f"One pass while streaming ({res['mib_per_pass']:.0f} MiB read per pass), after 64 tokens of context:", "",
              "| rows | " + " | ".join(str(r) for r in ps) + " |", "|---" * (len(ps) + 1) + "|",
              "| ms | " + " | ".join(f"{t * 1e3:.1f}" for t in ps.values()) + " |",
              "| x one row | " + " | ".join(f"{t / ps[next(iter(ps))]:.2f}" for t in ps.values()) + " |"]
    return "\n".join(lines) + "\n"


def main() -> int:
    from sli.offline.fetch import sli_home

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="none")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--budget", default="200MB", help="sli's memory budget (below the model's size, so layers stream)")
    ap.add_argument("--limit", default=None, help="a memory cgroup limit for a cold run, e.g. 400MiB")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--draft", default=None, help="also a resident draft: a plan name (int4: the model's own) or a model")
    ap.add_argument("--cache", default=str(sli_home() / "cache"))
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        json.dump(child(a), sys.stdout)
        return 0
    res = _in_cgroup(a) if a.limit else child(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative.json").write_text(json.dumps(res, indent=1))
    (out / "speculative.md").write_text(markdown(res))
    print(markdown(res))
    return 0


def _in_cgroup(a) -> dict:
    from runtime.memory import parse_size
    from sli.bench_scale import MemoryCgroup, drop_caches
    from sli.offline.fetch import fetch_model
    from sli.processor import UniversalSLIProcessor

    proc = UniversalSLIProcessor(fetch_model(), quantization_config=a.mode, cache_dir=a.cache, dtype=a.dtype, progress=False)
    proc.load()  # built before the cold run
    proc.close()
    if a.draft:
        draft = UniversalSLIProcessor(fetch_model(), quantization_config=a.draft, cache_dir=a.cache, progress=False)
        draft.load()
        draft.close()
    drop_caches([Path(a.cache)])
    cg = MemoryCgroup(parse_size(a.limit))
    try:
        cmd = [sys.executable, __file__, "--child", "--mode", a.mode, "--dtype", a.dtype, "--budget", a.budget, "--limit", a.limit,
               "--new-tokens", str(a.new_tokens), "--cache", a.cache] + (["--draft", a.draft] if a.draft else [])
        cp = subprocess.run(cg.wrap(cmd), capture_output=True, text=True)
        if cp.returncode:
            raise RuntimeError(f"the measurement failed in cgroup {cg.path} (limit {a.limit}):\n{cp.stderr[-3000:]}")
        res = json.loads(cp.stdout)
        res["cgroup_peak_mib"] = (cg.peak_bytes() or 0) / 2**20
        return res
    finally:
        cg.close()


if __name__ == "__main__":
    sys.exit(main())
