"""Quality table for issue #6: every mode, the INT8/NF4 preset and salience-driven plans,
validated against the unquantized model (perplexity on the pydoc_data topics, greedy
retention), with bits per weight, cache size and quantization time; JSON, markdown and a
PNG plot of perplexity against bits per weight.

    python scripts/measure_quality.py SmolLM2-135M-Instruct --out quality-results
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from sli import UniversalSLIProcessor
from sli.quantization import QuantizationConfig, get_mixed_precision_config
from sli.validate import validate

MODES = ("none", "int8", "int8_dynamic", "nf4", "fp4", "int4", "int2")


def quantized_bits(report) -> float:
    """Bits on disk per weight of the quantized tensors only (codes and scales)."""
    params = sum(c["params"] for k, c in report.codec_bytes.items() if k != "raw")
    stored = sum(c["stored"] for k, c in report.codec_bytes.items() if k != "raw")
    return 8 * stored / params if params else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--cache", default="/tmp/sli-quality-cache")
    ap.add_argument("--out", default="quality-results")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--targets", default="4.5,5")
    ap.add_argument("--modes", default=",".join(MODES))
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    runs = [(m, lambda m=m: UniversalSLIProcessor(a.model, quantization_config=QuantizationConfig(mode=m), cache_dir=a.cache, progress=False))
            for m in a.modes.split(",") if m]
    runs.append(("attn INT8 / FFN NF4", lambda: UniversalSLIProcessor(a.model, adaptive_quantizer=get_mixed_precision_config(),
                                                                         cache_dir=a.cache, progress=False)))
    for t in (float(x) for x in a.targets.split(",") if x):
        runs.append((f"salience {t:g} bits", lambda t=t: UniversalSLIProcessor.for_target_bits(a.model, t, cache_dir=a.cache, progress=False)))
    for label, make in runs:
        t0 = time.perf_counter()
        p = make()
        plan_seconds = time.perf_counter() - t0
        r = validate(p, max_tokens=a.max_tokens)
        rep = p.quantize()
        row = {
            "mode": label,
            "bits_per_weight_all": rep.bits_per_weight,
            "bits_per_weight_quantized": quantized_bits(rep),
            "cache_MB": rep.stored_bytes / 1e6,
            "perplexity": r.perplexity,
            "reference_perplexity": r.reference_perplexity,
            "delta_pct": r.perplexity_delta_pct,
            "retention_exact": r.retention_exact_match,
            "retention_tokens": r.retention_token_agreement,
            "quantize_s": rep.seconds + (plan_seconds if label.startswith("salience") else 0.0),
            "tokens_scored": r.tokens_scored,
        }
        if hasattr(p, "salience"):
            row["salience_choices"] = p.salience.counts()
            row["salience_achieved_bits"] = p.salience.achieved_bits
        p.close()
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| mode | bits/weight (quantized tensors) | bits/weight (all) | cache MB | perplexity | delta % | retention (exact) | retention (tokens) | quantize s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['bits_per_weight_quantized']:.2f} | {r['bits_per_weight_all']:.2f} | {r['cache_MB']:.1f} | "
            f"{r['perplexity']:.3f} | {r['delta_pct']:+.2f} | {r['retention_exact']:.0%} | {r['retention_tokens']:.0%} | {r['quantize_s']:.1f} |"
        )
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        x = r["bits_per_weight_quantized"] if r["mode"] != "none" else 16.0
        ax.scatter([x], [r["perplexity"]], s=40)
        ax.annotate(r["mode"], (x, r["perplexity"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.axhline(rows[0]["reference_perplexity"], linestyle="--", linewidth=1, color="gray", label="reference (none)")
    ax.set_xlabel("bits per weight of the quantized tensors (none: 16)")
    ax.set_ylabel("perplexity, pydoc_data topics")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)


if __name__ == "__main__":
    main()
