"""Time each linear kernel sli can use, on every CPU capability this host offers.

Each capability runs in its own process (``ATEN_CPU_CAPABILITY``); every kernel is first
checked against the dequantized reference, then timed (median of repeats) for a decode step
(1 token) and a prefill chunk (128 tokens), on the projection shapes of the real model and of
an 8B-class model. Writes docs/results/kernels.md and kernels.json.

    python scripts/measure_kernels.py [--out docs/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"135M mlp.down (576x1536)": (576, 1536), "8B mlp.down (4096x14336)": (4096, 14336)}
TOKENS = (1, 128)


def _time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def child() -> None:
    import torch
    from torch.nn import functional as F

    from cache import CodecName, get_codec
    from runtime.kernels import Int4CpuKernel, cpu_capability

    torch.manual_seed(0)
    rows = []
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.02
        enc = get_codec(CodecName.INT4_GROUP).encode(w, group_size=128)
        deq = get_codec(CodecName.INT4_GROUP).decode(enc, torch.float32)
        t_convert = _time(lambda: Int4CpuKernel.pack(enc), 3)
        packed = Int4CpuKernel.pack(enc)
        err = Int4CpuKernel.check(enc, packed, label)
        w8 = get_codec(CodecName.INT8_CHANNEL).encode(w)
        q8, s8 = w8.parts["q"], w8.parts["scale"]
        deq_bf16 = deq.to(torch.bfloat16)
        for m in TOKENS:
            x32 = torch.randn(m, k)
            x16 = x32.to(torch.bfloat16)
            reps = 20 if n * k < 1 << 24 else 5
            ref = x32 @ deq.T
            y8 = torch._weight_int8pack_mm(x32, q8, s8)
            err8 = float((y8 - x32 @ get_codec(CodecName.INT8_CHANNEL).decode(w8, torch.float32).T).norm() / ref.norm())
            rows.append({
                "shape": label, "tokens": m, "capability": cpu_capability(),
                "fp32 linear ms": 1e3 * _time(lambda: F.linear(x32, deq), reps),
                "bf16 linear ms": 1e3 * _time(lambda: F.linear(x16, deq_bf16), reps),
                "int4 packed (bf16) ms": 1e3 * _time(lambda: Int4CpuKernel.matmul(x16, packed), reps),
                "int8 _weight_int8pack_mm (fp32) ms": 1e3 * _time(lambda: torch._weight_int8pack_mm(x32, q8, s8), reps),
                "int4 convert ms": 1e3 * t_convert,
                "int4 rel err": err,
                "int8 rel err": err8,
            })
    print(json.dumps(rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    rows = []
    for cap in ("default", "avx2", "avx512"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(os.cpu_count()))
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
        if probe.lower() != cap:
            print(f"{cap}: not offered by this CPU (torch runs {probe}); skipped", file=sys.stderr)
            continue
        r = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=True)
        rows += json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{cap}: done", file=sys.stderr)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(rows, indent=1))
    import torch

    cols = ["fp32 linear ms", "bf16 linear ms", "int4 packed (bf16) ms", "int8 _weight_int8pack_mm (fp32) ms", "int4 convert ms"]
    lines = [
        f"# Linear kernels per CPU capability ({os.cpu_count()} cores, torch {torch.__version__})",
        "",
        "Median time of one `x @ W.T`; every kernel checked first against the dequantized weight "
        "(int4 relative error shown). `int4 convert`: torch's converter from sli's portable codes to "
        "the kernel's layout for this capability (done once, into the derived copy).",
        "",
        "| shape | tokens | capability | " + " | ".join(cols) + " | int4 rel err |",
        "|---|---:|---|" + "---:|" * (len(cols) + 1),
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['capability']} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
                     + f" | {r['int4 rel err']:.1e} |")
    (out / "kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    else:
        sys.exit(main())
