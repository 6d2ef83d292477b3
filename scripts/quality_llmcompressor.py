#!/usr/bin/env python3
"""llm-compressor's GPTQ or AWQ on given calibration token ids, its result written back as
plain dequantized float weights, for ``sli bench --quality`` to score with sli's own code.

Runs in llm-compressor's own environment (``$SLI_HOME/peers/venv-llmcompressor``), never in
sli's: it imports nothing of sli.

    venv-llmcompressor/bin/python scripts/quality_llmcompressor.py MODEL --method gptq --bits 4 \\
        --group-size 64 [--symmetric] --ids calib.pt --out DIR

- ``--ids``: a torch file holding the ``[N, L]`` token ids sli calibrates on (the same samples).
- On a CPU-only torch, llm-compressor's AWQ needs one workaround (:func:`cpu_workarounds`).
- The recipe: int weights in groups, targets ``Linear``, ``lm_head`` ignored, llm-compressor's
  defaults otherwise (GPTQ: block 128, dampening 0.01, static act-order; AWQ: duo scaling,
  20 grid points, followed by round to nearest on its grid).
- ``DIR/model.safetensors``: every parameter as a plain tensor, quantized Linears' weights as
  ``fake_quantize(weight, scale, zero_point)`` (compressed-tensors' own dequantization), AWQ's
  scaled norms included. ``DIR/result.json``: oneshot's wall time, peak anonymous RSS over the
  baseline after imports (``/proc/self/status`` RssAnon, sampled every 10 ms), versions.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    def __init__(self) -> None:
        self.base = rss_anon()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_anon())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon())


def scheme(bits: int, group: int, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = QuantizationArgs(num_bits=bits, type="int", strategy="group", group_size=group, symmetric=symmetric)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=w)}


def recipe(method: str, bits: int, group: int, symmetric: bool):
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(config_groups=scheme(bits, group, symmetric), ignore=["lm_head"])
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    return [AWQModifier(), QuantizationModifier(config_groups=scheme(bits, group, symmetric), ignore=["lm_head"])]


def cpu_workarounds() -> list[str]:
    """llm-compressor 0.14's AWQ pins its cached intermediates (``Tensor.pin_memory``), which
    raises on a CPU-only torch ("Cannot access accelerator device"). Pinning only speeds
    copies to a GPU; on the CPU it is made a no-op, nothing else changes."""
    from llmcompressor.pipelines import cache

    if torch.cuda.is_available() or not hasattr(cache.IntermediatesCache, "pin_memory"):
        return []
    cache.IntermediatesCache.pin_memory = lambda self, *a, **k: None
    return ["IntermediatesCache.pin_memory is a no-op (CPU-only torch)"]


def dequantized_state(model, method: str) -> dict[str, torch.Tensor]:
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    quant_params = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")
    out = {}
    for name, mod in model.named_modules():
        args = getattr(getattr(mod, "quantization_scheme", None), "weights", None)
        if args is None or not hasattr(mod, "weight_scale"):
            continue
        g_idx = getattr(mod, "weight_g_idx", None)
        if g_idx is not None and g_idx.numel() and not torch.equal(g_idx, torch.arange(g_idx.numel(), device=g_idx.device) // args.group_size):
            raise SystemExit(f"{name}: groups are not contiguous (act-order 'group'); this script reads static groups only")
        dq = fake_quantize(mod.weight.detach(), mod.weight_scale, getattr(mod, "weight_zero_point", None), args)
        # GPTQ leaves each weight fake-quantized in place: the two must agree (after AWQ the weight is the
        # scaled float one, and this is its rounding)
        if method == "gptq" and not torch.allclose(dq.float(), mod.weight.detach().float(), atol=1e-6, rtol=0):
            raise SystemExit(f"{name}: fake_quantize of the stored scale and zero point differs from the weight oneshot left")
        levels = max(len(torch.unique(g)) for g in dq.float().reshape(dq.shape[0], -1, args.group_size)[:4].reshape(-1, args.group_size))
        if levels > 2 ** args.num_bits:
            raise SystemExit(f"{name}: a group holds {levels} levels, more than {2 ** args.num_bits}")
        out[f"{name}.weight"] = dq.to(torch.float32)
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[-1] in quant_params or k in out:
            continue
        out[k] = v.detach().to(torch.float32)
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)  # tied: the embeddings are the head
    return {k: v.contiguous() for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--method", choices=["gptq", "awq"], required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--ids", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-weights", action="store_true", help="time and memory only (no weights written)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workarounds = cpu_workarounds()
    torch.manual_seed(0)
    ids = torch.load(a.ids)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    tok = AutoTokenizer.from_pretrained(str(a.model))
    with Peak() as peak:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(a.model), dtype=torch.float32)
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        model = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe(a.method, a.bits, a.group_size, a.symmetric),
                        num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
        seconds = time.perf_counter() - t1
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.no_weights:
        save_file(dequantized_state(model, a.method), str(a.out / "model.safetensors"), metadata={"format": "pt"})
    res = {"seconds": seconds, "load_seconds": t_load, "peak_rss_bytes": peak.peak - peak.base, "samples": list(ids.shape),
           "threads": torch.get_num_threads(), "workarounds": workarounds,
           "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                        "transformers": transformers.__version__, "torch": torch.__version__}}
    (a.out / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
