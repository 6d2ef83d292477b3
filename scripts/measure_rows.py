"""Time each way of multiplying a 4-bit (and an 8-bit) weight by 1..128 rows of activations:
the crossover table behind :mod:`runtime.rows`.

Kernels, each checked first against the dequantized weight:

- ``int4 packed``: torch's ``_weight_int4pack_mm_for_cpu`` on the derived layout;
- ``dequant+gemm``: sli's portable int4 codes dequantized to bf16 a tile of rows at a time
  (:func:`runtime.rows.dequantize_int4_into`), each tile multiplied by oneDNN's bf16 GEMM;
- ``dequant whole``: the whole weight dequantized into one bf16 scratch, then one GEMM;
- ``bf16 held``: a bf16 copy held in memory (the upper bound of the GEMM side);
- ``int8 _weight_int8pack_mm``: torch's int8 weight kernel, bf16 activations.

Shapes: Llama-3.2-1B's (hidden 2048, intermediate 8192, kv 512: q, o, fused q+k+v, fused
gate+up, down) and an 8 B model's (4096 / 14336 / kv 1024); ``--real`` adds SmolLM2-135M's.

    python scripts/measure_rows.py [--scale 1b,8b,135m] [--out docs/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache import CodecName, get_codec  # noqa: E402
from runtime.kernels import Int4CpuKernel, cpu_capability  # noqa: E402
from runtime.rows import Int4Codes, dequantize_int4_into, rows_matmul  # noqa: E402

ROWS = (1, 2, 4, 8, 16, 64, 128)
SHAPES = {
    "135m": {"q/o 576x576": (576, 576), "qkv 960x576": (960, 576), "gate+up 3072x576": (3072, 576), "down 576x1536": (576, 1536)},
    "1b": {"q/o 2048x2048": (2048, 2048), "kv 512x2048": (512, 2048), "qkv 3072x2048": (3072, 2048),
           "gate+up 16384x2048": (16384, 2048), "down 2048x8192": (2048, 8192)},
    "8b": {"q/o 4096x4096": (4096, 4096), "qkv 6144x4096": (6144, 4096), "gate+up 28672x4096": (28672, 4096),
           "down 4096x14336": (4096, 14336)},
}


def _time(fn, budget_s: float = 0.5, max_reps: int = 25) -> float:
    """Best of repeats, in ms: on a shared host the fastest run is the one no other process
    stalled (a median there measures the neighbours' load)."""
    fn()
    ts: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(ts) < 5 or (len(ts) < max_reps and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).norm() / ref.norm())


def measure(scale: str, group_size: int) -> list[dict]:
    rows_out = []
    gen = torch.Generator().manual_seed(0)
    for label, (n, k) in SHAPES[scale].items():
        w = torch.randn(n, k, generator=gen) * 0.02
        enc = get_codec(CodecName.INT4_GROUP).encode(w, group_size=group_size)
        deq = get_codec(CodecName.INT4_GROUP).decode(enc, torch.float32)
        packed = Int4CpuKernel.pack(enc)
        codes = Int4Codes.of([enc])
        held = deq.to(torch.bfloat16)
        scratch = torch.empty(n, k, dtype=torch.bfloat16)
        q8 = get_codec(CodecName.INT8_CHANNEL).encode(w, scale_dtype=torch.bfloat16)
        q8w, q8s = q8.parts["q"], q8.parts["scale"]
        t_deq = _time(lambda: dequantize_int4_into(codes, scratch))
        del w
        for m in ROWS:
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            ref = x.float() @ deq.T
            kernels = {
                "int4 packed": lambda: Int4CpuKernel.matmul(x, packed),
                "dequant+gemm": lambda: rows_matmul(x, codes),
                "dequant whole": lambda: F.linear(x, dequantize_int4_into(codes, scratch)),
                "bf16 held": lambda: F.linear(x, held),
                "int8 pack_mm": lambda: torch._weight_int8pack_mm(x, q8w, q8s),
            }
            row = {"scale": scale, "shape": label, "n": n, "k": k, "rows": m, "group_size": group_size,
                   "capability": cpu_capability(), "dequantize only ms": t_deq}
            for name, fn in kernels.items():
                err = _rel(fn(), ref if name != "int8 pack_mm" else x.float() @ get_codec(CodecName.INT8_CHANNEL).decode(q8, torch.float32).T)
                if err > 0.03:
                    raise SystemExit(f"{name} on {label}: relative error {err:.3g} against the dequantized weight")
                row[f"{name} ms"] = _time(fn)
                row[f"{name} err"] = err
            rows_out.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if not k.endswith("err")}),
                  file=sys.stderr, flush=True)
    return rows_out


def markdown(rows: list[dict]) -> str:
    cols = ["int4 packed", "dequant+gemm", "dequant whole", "bf16 held", "int8 pack_mm"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")
    lines = [f"# Linear kernels by rows ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, capability {cpu_capability()}, torch {torch.__version__})",
             "", "Best-of-repeats ms of one `x @ W.T` (bf16 activations), int4 groups of "
             f"{rows[0]['group_size']}; every kernel checked first against the dequantized weight. `dequant whole`: "
             "the whole weight dequantized into a bf16 scratch and one GEMM; `dequant+gemm`: tiles of rows "
             "(sli's rows path). Bold: the fastest int4 kernel that needs no bf16 copy.", "",
             "| scale | shape | rows | " + " | ".join(cols) + " |", "|---|---|---:|" + "---:|" * len(cols)]
    for r in rows:
        best = min(("int4 packed", "dequant+gemm", "dequant whole"), key=lambda c: r[f"{c} ms"])
        cells = [(f"**{r[f'{c} ms']:.2f}**" if c == best else f"{r[f'{c} ms']:.2f}") for c in cols]
        lines.append(f"| {r['scale']} | {r['shape']} | {r['rows']} | " + " | ".join(cells) + " |")
    deq = {(r["scale"], r["shape"]): r["dequantize only ms"] for r in rows if r.get("dequantize only ms") is not None}
    lines += ["", "Dequantizing the whole weight to bf16 alone (ms): " + ", ".join(f"{s} {sh} {v:.2f}" for (s, sh), v in deq.items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="1b,8b")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 gives steadier ratios on a host shared with other work")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows: list[dict] = []
    for s in a.scale.split(","):
        rows += measure(s.strip(), a.group_size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    (out / "rows.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
