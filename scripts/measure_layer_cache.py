"""The quantization document's figures that sli can measure, on the real model: the size of
a `LayerCache` holding every decoder layer in each mode, and the time `get_layer` takes to
load a layer from it (its benchmarking example), against FP16.

Each mode gets its own cache directory; loading is timed cold (the cache's files dropped
from the page cache first) and warm (read once before), with the in-memory LRU off, over
all 30 layers. Writes docs/results/layer_cache.md and .json.

    python scripts/measure_layer_cache.py [--model SmolLM2-135M-Instruct] [--out docs/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

MODES = ["fp16", "int8", "int8_dynamic", "nf4", "fp4", "int4"]


def benchmark_loading(cache, model_id, num_layers):
    """The document's benchmark: mean seconds per get_layer."""
    times = []
    for i in range(num_layers):
        start = time.perf_counter()
        layer = cache.get_layer(model_id, i)
        times.append(time.perf_counter() - start)
        assert layer is not None
    return sum(times) / len(times)


def main() -> None:
    from transformers import AutoModelForCausalLM

    from cache.readahead import drop_file_cache
    from sli.layer_cache import LayerCache
    from sli.offline.fetch import resolve_model
    from sli.quantization import LayerQuantizer, QuantizationConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    path = resolve_model(a.model)
    work = Path(tempfile.mkdtemp(prefix="sli-layer-cache-"))
    rows = []
    try:
        for mode in MODES:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).eval()
            layers = model.model.layers
            cache = LayerCache(cache_dir=work / mode, max_memory_cache_size_gb=0)
            t0 = time.perf_counter()
            for i, layer in enumerate(layers):
                if mode != "fp16":
                    layer = LayerQuantizer(QuantizationConfig(mode=mode)).quantize_layer(layer, f"model.layers.{i}")
                cache.cache_layer("smollm2", i, layer, "none" if mode == "fp16" else mode)
            build = time.perf_counter() - t0
            size = cache.size_bytes()
            file_size = (work / mode / "data.mdb").stat().st_size
            cache.close()
            cold, warm = [], []
            for _ in range(a.repeats):
                # cold: no process maps the file and its pages are dropped (mapped pages would stay)
                dropped = sum(drop_file_cache(f) for f in (work / mode).glob("*.mdb"))
                cache = LayerCache(cache_dir=work / mode, max_memory_cache_size_gb=0)
                cold.append(benchmark_loading(cache, "smollm2", len(layers)))
                warm.append(benchmark_loading(cache, "smollm2", len(layers)))
                cache.close()
            assert dropped > 0
            rows.append({"mode": mode, "layers": len(layers), "stored_bytes": size, "file_bytes": file_size,
                         "build_s": build, "cold_ms": 1e3 * min(cold), "warm_ms": 1e3 * min(warm)})
            print(rows[-1], flush=True)
            del model
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]
    for r in rows:
        r["size_vs_fp16"] = r["stored_bytes"] / base["stored_bytes"]
        r["cold_speedup"] = base["cold_ms"] / r["cold_ms"]
        r["warm_speedup"] = base["warm_ms"] / r["warm_ms"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"host": platform.processor() or platform.machine(), "torch": torch.__version__, "model": str(path),
            "repeats": a.repeats, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    (out / "layer_cache.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# LayerCache on the real model (SmolLM2-135M-Instruct, its 30 decoder layers)",
        "",
        "Made by `python scripts/measure_layer_cache.py`. Each mode in its own cache; a layer is quantized by",
        "`LayerQuantizer` (compute dtype float16) and stored with `cache_layer`; loading is the document's",
        "`benchmark_loading` (`get_layer` over all layers, in-memory LRU off), best of "
        f"{a.repeats}, cold (page cache dropped) and warm. CPU capability {meta['cpu_capability']}, torch {meta['torch']}.",
        "",
        "| mode | stored | vs FP16 | file | load cold, ms/layer | speed-up | load warm, ms/layer | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['stored_bytes'] / 1e6:.1f} MB | {r['size_vs_fp16']:.2f} | {r['file_bytes'] / 1e6:.1f} MB | "
            f"{r['cold_ms']:.2f} | {r['cold_speedup']:.2f}x | {r['warm_ms']:.2f} | {r['warm_speedup']:.2f}x |"
        )
    (out / "layer_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
