"""Importance-weighted grids on the real model (issue 28): each configuration quantized into a
fresh cache, then scored as ``sli bench --quality`` scores (transformers' float32 model holding
the cache's dequantized weights, sli's sliding-window perplexity on the first ``--eval-tokens``
tokens of the pydoc topics, which no calibration sees) against the unquantized model.
Bits per weight are all-in: the cache's stored bytes over every parameter.

    python scripts/measure_imatrix.py SmolLM2-135M-Instruct --out /tmp/imatrix.jsonl \\
        --runs rtn-g64,rtn+imp-g64,gptq-g64,gptq+imp-g64

A run is ``METHOD[+imp]-gGROUP[-int3][-sym][-keepvocab|-vocab4]`` with METHOD one of none, rtn, gptq,
awq+gptq (``rtn`` without ``+imp`` is plain round to nearest, no calibration); the embeddings and
head are int8 rows unless ``keepvocab`` (kept) or ``vocab4`` (int4 rows in the same groups). One JSON line
per run is appended to ``--out`` as it finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path


def plan(run: str, cal):
    from sli.offline.config import QuantizationConfig

    parts = run.split("-")
    method, imp = parts[0].removesuffix("+imp"), parts[0].endswith("+imp")
    group = int(next(p for p in parts[1:] if p.startswith("g"))[1:])
    bits = 3 if "int3" in parts else 4
    calib = None
    if imp or method != "rtn":
        calib = dataclasses.replace(cal, method=method, importance=imp)
    return QuantizationConfig(mode=f"int{bits}", group_size=group, symmetric="sym" in parts, calibration=calib,
                              vocab_mode="none" if "keepvocab" in parts else "int4" if "vocab4" in parts else None)


def markdown(rows: list[dict]) -> str:
    """The runs as a markdown table (bits per weight all-in, held-out loss)."""
    lines = ["| configuration | calibration samples x 512 | bits per weight, all-in | perplexity | loss | quantize s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cal = "-" if r["run"].startswith("rtn-") else str(r["samples"])
        lines.append(f"| {r['run']} | {cal} | {r['bits_per_weight_all']:.3f} | {r['perplexity']:.3f} | "
                     f"{r['loss_pct']:+.2f}% | {r['quantize_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--runs", default="", help="comma-separated runs (see the module docstring)")
    ap.add_argument("--markdown", action="store_true", help="print --out's runs as a markdown table and stop")
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if a.markdown:
        print(markdown([json.loads(line) for line in Path(a.out).read_text().splitlines() if line.strip()]), end="")
        return

    import torch

    from cache.store import LayerStore
    from sli.bench_quality import _perplexity
    from sli.offline.calibration import CalibrationConfig
    from sli.offline.sources import open_source
    from sli.offline.writer import quantize_model

    src = open_source(a.model)
    path = str(src.path)
    ev = {"tokens": a.eval_tokens, "max_length": 512, "stride": 256}
    cal = CalibrationConfig(samples=a.samples, seqlen=a.seqlen)
    ref = _perplexity(path, {}, ev)
    for run in [r for r in a.runs.split(",") if r]:
        work = Path(tempfile.mkdtemp(prefix="sli-imatrix-"))
        try:
            t0 = time.perf_counter()
            with LayerStore(work) as st:
                report = quantize_model(open_source(a.model), plan(run, cal), st, progress=False)
            secs = time.perf_counter() - t0
            with LayerStore(work, readonly=True) as st:
                state = dict(st.iter_tensors(report.variant_id, torch.float32))
            ppl = _perplexity(path, state, ev)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row = {"run": run, "bits_per_weight_all": round(report.bits_per_weight, 4), "perplexity": ppl, "reference": ref,
               "loss_pct": round(100 * (ppl / ref - 1), 3), "quantize_s": round(secs, 1), "samples": a.samples,
               "seqlen": a.seqlen, "eval_tokens": a.eval_tokens}
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        logging.warning("%s", json.dumps(row))


if __name__ == "__main__":
    main()
