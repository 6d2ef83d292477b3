"""Issue #5's measurement: turn-2 time to first token with KV reuse against the same turn
with reuse off, on a history of about 600 tokens, in this process and in a new process
that finds the blocks spilled to disk.

    python scripts/measure_chat.py SmolLM2-135M-Instruct --budget 96MB --mode nf4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

SYSTEM = "You are a careful assistant. Answer questions about the document the user gives, briefly and precisely."
QUESTION_1 = "Here is a document:\n\n{doc}\n\nSummarise it in two sentences."
QUESTION_2 = "Which statement does the document describe first, and what does it do?"


def document(tokenizer, tokens: int) -> str:
    from pydoc_data.topics import topics

    text = topics["assert"] + "\n" + topics["assignment"]
    ids = tokenizer(text)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def turn2(args, messages, reuse: bool) -> dict:
    from sli import UniversalSLIProcessor

    p = UniversalSLIProcessor(args.model, quantization_config=args.mode, cache_dir=args.cache, memory_budget=args.budget,
                              dtype=args.dtype, context_tokens=args.context, progress=False)
    out = {}
    for label, r in (("reuse", True), ("no reuse", False)) if reuse else (("no reuse", False),):
        chat = p.chat(system_prompt=SYSTEM, messages=[dict(m) for m in messages])
        res = chat.send(QUESTION_2, max_new_tokens=args.new_tokens, prefix_cache=r)
        s = res.stats
        out[label] = {"ttft_s": s.time_to_first_token_s, "prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens,
                      "disk_cached_tokens": s.disk_cached_tokens, "prefill_tokens": s.prefill_tokens,
                      "peak_rss_MB": s.peak_rss_bytes / 1e6, "text": res.text}
    p.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--mode", default="nf4")
    ap.add_argument("--budget", default="96MB")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--doc-tokens", type=int, default=520)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # the new process: only the history, nothing in memory
        print("RESULT " + json.dumps(turn2(args, json.loads(args.child), reuse=True)))
        return
    args.cache = args.cache or tempfile.mkdtemp(prefix="sli-chat-")
    from sli import UniversalSLIProcessor

    p = UniversalSLIProcessor(args.model, quantization_config=args.mode, cache_dir=args.cache, memory_budget=args.budget,
                              dtype=args.dtype, context_tokens=args.context, progress=False)
    p.load()  # quantizes if needed: the tokenizer comes from the cache
    chat = p.chat(system_prompt=SYSTEM)
    r1 = chat.send(QUESTION_1.format(doc=document(p.tokenizer, args.doc_tokens)), max_new_tokens=args.new_tokens)
    history = [dict(m) for m in chat.messages]
    same = {}
    for label, reuse in (("reuse", True), ("no reuse", False)):
        c = p.chat(system_prompt=SYSTEM, messages=[dict(m) for m in history])
        s = c.send(QUESTION_2, max_new_tokens=args.new_tokens, prefix_cache=reuse).stats
        same[label] = {"ttft_s": s.time_to_first_token_s, "prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens,
                       "prefill_tokens": s.prefill_tokens, "peak_rss_MB": s.peak_rss_bytes / 1e6}
    plan = p.load().plan.describe()
    p.close()
    child = subprocess.run([sys.executable, __file__, args.model, "--mode", args.mode, "--budget", args.budget, "--dtype", args.dtype,
                            "--context", str(args.context), "--new-tokens", str(args.new_tokens), "--cache", args.cache,
                            "--child", json.dumps(history)], capture_output=True, text=True, check=True)
    new = json.loads(next(line for line in child.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result = {
        "plan": plan,
        "turn1": {"prompt_tokens": r1.stats.prompt_tokens, "ttft_s": r1.stats.time_to_first_token_s},
        "same_process": same,
        "new_process": new,
        "speedup_same_process": same["no reuse"]["ttft_s"] / same["reuse"]["ttft_s"],
        "speedup_new_process": new["no reuse"]["ttft_s"] / new["reuse"]["ttft_s"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
