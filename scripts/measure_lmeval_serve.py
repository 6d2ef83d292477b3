"""lm-eval-harness scoring through `sli serve`: its `local-completions` model (prompt
log-probabilities from /v1/completions with `echo` and `logprobs`) on a task whose data is
local, beside lm-eval's own `hf` model (transformers in memory, fp32) on the same task.
Writes docs/results/lmeval_serve.md (and .json).

lm-eval is not a dependency of sli: it runs from its own environment (the peers venv,
`$SLI_HOME/peers/venv-bench`, made by scripts/setup_peers.sh), talking to the server over loopback.

    python scripts/measure_lmeval_serve.py [--lm-eval PATH] [--include-path scripts/peers/lmeval_task]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from sli.bench_serve import SERVED_NAME, ServerProcess, free_port
from sli.offline.fetch import fetch_model, sli_home

RUNS = [  # (label, sli serve options)
    ("sli serve, mode none, fp32, everything resident", ["--mode", "none", "--dtype", "float32"]),
    ("sli serve, int4, bf16, 64MB (layers streamed)", ["--mode", "int4", "--dtype", "bfloat16", "--memory-budget", "64MB"]),
    ("sli serve, int4, bf16, 64MB, int8 KV", ["--mode", "int4", "--dtype", "bfloat16", "--memory-budget", "64MB", "--kv-dtype", "int8"]),
]


def lm_eval(exe: str, model_args: list[str], include: str, task: str, out: Path) -> tuple[dict, dict]:
    """Run lm-eval; returns (the task's metrics, per document the log-likelihood of each choice)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [exe, *model_args, "--include_path", include, "--tasks", task, "--output_path", str(out), "--log_samples"]
    cp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if cp.returncode != 0:
        raise RuntimeError(f"lm-eval failed ({cp.returncode}):\n{cp.stderr[-2000:]}")
    results = json.loads(Path(sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True))[-1]).read_text())
    samples = {}
    for line in Path(sorted(glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True))[-1]).read_text().splitlines():
        d = json.loads(line)
        samples[d["doc_id"]] = [float(r[0][0] if isinstance(r[0], list) else r[0]) for r in d["resps"]]
    return results["results"][task], samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lm-eval", default=str(sli_home() / "peers" / "venv-bench" / "bin" / "lm_eval"))
    ap.add_argument("--include-path", default="scripts/peers/lmeval_task")
    ap.add_argument("--task", default="sli_mc")
    ap.add_argument("--cache", default=str(sli_home() / "cache"))
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--work", default="/tmp/sli-lmeval")
    a = ap.parse_args()
    if not Path(a.lm_eval).exists():
        raise SystemExit(f"no lm_eval at {a.lm_eval}: make the peers environment (scripts/setup_peers.sh) or pass --lm-eval")
    model = fetch_model()
    work = Path(a.work)
    rows = []
    ref, ref_ll = lm_eval(a.lm_eval, ["--model", "hf", "--model_args", f"pretrained={model},dtype=float32", "--device", "cpu"],
                          a.include_path, a.task, work / "hf")
    rows.append({"run": "lm-eval hf (transformers in memory, fp32)", **ref, "max_abs_ll_diff": 0.0})
    print(rows[-1], flush=True)
    for label, opts in RUNS:
        port = free_port()
        cmd = [sys.executable, "-m", "sli.cli", "serve", str(model), "--cache", a.cache, "--port", str(port),
               "--served-model-name", SERVED_NAME, *opts]
        server = ServerProcess(cmd, port, log_path=work / f"serve-{len(rows)}.log")
        try:
            args = [f"model={SERVED_NAME}", f"base_url=http://127.0.0.1:{port}/v1/completions", f"tokenizer={model}",
                    "tokenizer_backend=huggingface", "num_concurrent=4", "max_retries=1"]
            res, ll = lm_eval(a.lm_eval, ["--model", "local-completions", "--model_args", ",".join(args)], a.include_path, a.task,
                              work / f"run{len(rows)}")
        finally:
            status = server.stop()
        diff = max(abs(x - y) for d in ref_ll for x, y in zip(ref_ll[d], ll[d]))
        rows.append({"run": label, **res, "max_abs_ll_diff": diff, "server_exit": status})
        print(rows[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lmeval_serve.json").write_text(json.dumps(rows, indent=1))
    n = len(ref_ll)
    lines = [f"# lm-eval-harness through `sli serve` ({a.task}: {n} questions, {sum(len(v) for v in ref_ll.values())} choices)", "",
             "lm-eval's `local-completions` model scores each choice by the prompt log-probabilities /v1/completions returns "
             "(`echo` with `logprobs`, as vLLM gives them), beside lm-eval's `hf` model running transformers in memory on the "
             "same task. The task's data is a local JSON lines file (nothing comes from a dataset hub). Last column: the largest "
             "difference, over every choice, between the log-likelihood lm-eval got through the server and the one its hf "
             "model computed. `python scripts/measure_lmeval_serve.py`.", "",
             "| run | acc | acc_norm | max abs log-likelihood difference vs hf |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r.get('acc,none', 0):.2f} | {r.get('acc_norm,none', 0):.2f} | {r['max_abs_ll_diff']:.2e} |")
    (out / "lmeval_serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
