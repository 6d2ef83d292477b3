#!/usr/bin/env python3
"""Quantize a model in every mode, each in a fresh process (so peak memory is its own),
and print a markdown table: cache size, bits per weight, time, MB/s, peak anonymous RSS,
mean tensor relative MSE, zstd ratio. Also writes the rows as JSON.

    python scripts/measure_quantize.py SmolLM2-135M-Instruct --out bench-out/quantize.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ["none", "int8", "int8_dynamic", "nf4", "fp4", "int4", "int2", "mixed"]

_CHILD = """
import json, sys
from sli import UniversalSLIProcessor, get_mixed_precision_config
model, cache, mode = sys.argv[1:4]
kw = {"adaptive_quantizer": get_mixed_precision_config()} if mode == "mixed" else {"quantization_config": mode}
r = UniversalSLIProcessor(model, cache_dir=cache, progress=False, **kw).quantize(validate_memory=mode != "none")
s = r.summary()
s["stored_bytes"] = r.stored_bytes
s["original_bytes"] = r.original_bytes
s["peak_rss_bytes"] = r.peak_rss_bytes
q = {c: b for c, b in r.codec_bytes.items() if c != "raw"}
qp, qs, qr = (sum(b[k] for b in q.values()) for k in ("params", "stored", "raw"))
s["quantized_bits_per_weight"] = 8 * qs / qp if qp else None
s["quantized_zstd_ratio"] = qr / qs if qs else None
s["raw_zstd_ratio"] = r.codec_bytes["raw"]["raw"] / r.codec_bytes["raw"]["stored"] if "raw" in r.codec_bytes else None
print("RESULT " + json.dumps(s))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    rows = []
    for mode in a.modes.split(","):
        with tempfile.TemporaryDirectory() as cache:
            proc = subprocess.run([sys.executable, "-c", _CHILD, a.model, cache, mode], capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"mode {mode} failed:\n{proc.stderr[-3000:]}")
            s = json.loads(lines[0][7:])
            s["mode"] = mode
            s["data_mdb_MB"] = round((Path(cache) / "data.mdb").stat().st_blocks * 512 / 1e6, 1)  # allocated, not the sparse map
            rows.append(s)
            print(f"{mode}: {s['cache_MB']} MB, {s['seconds']} s", file=sys.stderr)
    print(f"model: {rows[0]['model']}  original {rows[0]['original_MB']} MB, largest group {rows[0]['largest_group_MB']} MB\n")
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    print(
        "| mode | cache MB | bits/weight (all) | bits/weight (quantized tensors) | reduction | time s | MB/s | "
        "peak anon RSS MB | mean rel MSE | zstd (all) | zstd (quantized) | zstd (kept 16-bit) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in rows:
        print(
            f"| {s['mode']} | {s['cache_MB']} | {s['bits_per_weight']:.2f} | {f(s['quantized_bits_per_weight'], '.2f')} | "
            f"{s['reduction_factor']:.2f}x | {s['seconds']:.1f} | {s['MB_per_s']:.0f} | {s['peak_rss_MB']:.0f} | "
            f"{s['mean_rel_mse']:.2e} | {s['zstd_ratio']:.3f} | {f(s['quantized_zstd_ratio'], '.3f')} | {f(s['raw_zstd_ratio'], '.3f')} |"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
