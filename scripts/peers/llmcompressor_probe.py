#!/usr/bin/env python3
"""llm-compressor's GPTQ and AWQ on the CPU, on local text, with the result written back as
plain dequantized weights another program can evaluate. Runs in venv-llmcompressor (built by
``scripts/setup_peers.sh llmcompressor``), never in sli's venv:

    $SLI_HOME/peers/venv-llmcompressor/bin/python scripts/peers/llmcompressor_probe.py \
        ~/.cache/sli/models/SmolLM2-135M-Instruct --out /tmp/llmc-probe --samples 8 --seqlen 128

For each method (``--methods gptq awq``), on a fresh copy of the model:

- ``oneshot(model, dataset, recipe)`` with int4 weights in groups of ``--group-size``,
  asymmetric, targets ``Linear``, ``lm_head`` ignored. GPTQ: ``GPTQModifier(config_groups=...)``.
  AWQ: ``[AWQModifier(), QuantizationModifier(config_groups=...)]`` (the transform-based API of
  llm-compressor 0.14; ``llmcompressor.modifiers.awq.AWQModifier`` is its deprecated shim). The
  calibration set is ``--samples`` x ``--seqlen`` tokens of stdlib docstrings
  (``inspect.getdoc``), passed as a ``datasets.Dataset`` of ``input_ids``: nothing from a hub.
- The dequantized weights: for every quantized Linear, ``fake_quantize(weight, weight_scale,
  weight_zero_point, scheme.weights)`` (compressed-tensors); the probe checks that the module's
  weight already equals it (llm-compressor leaves the weight fake-quantized in place after
  oneshot) and that each group holds at most 2^bits levels. They are written with every other
  parameter (AWQ's scaled norms included), minus the quantization parameters, as
  ``<out>/<method>/model.safetensors`` beside the source's config and tokenizer: a plain
  transformers folder.
- ``save_pretrained(<out>/<method>-dense, save_compressed=False)`` is tried too and compared
  (that folder's config.json carries a compressed-tensors ``quantization_config`` in the
  "dense" format, so a plain reader must ignore it).
- The perplexity of the source and of each dequantized folder, reloaded from disk with plain
  transformers, on other docstrings than the calibration's (a check that the folder works,
  not a quality claim).

Times and peak RSS go to ``<out>/probe.json`` (a method already there with the same settings is
kept, so ``--methods awq`` adds to an earlier GPTQ run). On a CPU-only torch, AWQ needs one
workaround (see :func:`cpu_only_workarounds`); the probe applies it and says so in the JSON.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import math
import resource
import shutil
import time
from pathlib import Path

import torch

CALIBRATION_MODULES = ["json", "os", "re", "collections", "inspect", "argparse", "subprocess", "threading", "pathlib",
                       "itertools", "functools", "typing", "logging", "asyncio", "unittest", "dataclasses", "email",
                       "http.client", "urllib.request", "tarfile", "zipfile", "csv", "sqlite3", "decimal"]
HELDOUT_MODULES = ["datetime", "fractions", "statistics", "heapq", "bisect", "textwrap", "difflib", "shutil",
                   "tempfile", "socket", "ssl", "contextlib"]
logger = logging.getLogger("llmcompressor_probe")


def docstrings(modules: list[str]) -> str:
    parts = []
    for name in modules:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def calibration_set(tok, n: int, seqlen: int):
    from datasets import Dataset

    ids = tok(docstrings(CALIBRATION_MODULES)).input_ids
    if len(ids) < n * seqlen:
        raise SystemExit(f"only {len(ids)} tokens of calibration text for {n} x {seqlen}")
    rows = [ids[i * seqlen:(i + 1) * seqlen] for i in range(n)]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seqlen for _ in rows]})


def scheme(bits: int, group: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = QuantizationArgs(num_bits=bits, type="int", strategy="group", group_size=group, symmetric=False)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=w)}


def cpu_only_workarounds() -> list[str]:
    """What llm-compressor 0.14 needs to run where torch has no accelerator."""
    done = []
    if not torch.accelerator.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        # AWQ pins its cached activations for faster host-to-device copies before each grid search
        # (AWQModifier._apply_smoothing -> IntermediatesCache.pin_memory); pinning needs an
        # accelerator, so a CPU-only torch raises "Cannot access accelerator device when none is
        # available". Nothing is copied to a device here: pinning is skipped.
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
        done.append("IntermediatesCache.pin_memory made a no-op (AWQ pins activations; a CPU-only torch cannot pin)")
    return done


def recipe(method: str, bits: int, group: int):
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(config_groups=scheme(bits, group), ignore=["lm_head"])
    if method == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(), QuantizationModifier(config_groups=scheme(bits, group), ignore=["lm_head"])]
    raise SystemExit(f"unknown method {method!r} (gptq, awq)")


def dequantized_state(model, bits: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Every parameter as a plain tensor, quantized Linears' weights as their dequantized grid."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    quant_params = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")
    out, checks = {}, {"quantized_linears": 0, "max_abs_weight_vs_fake_quant": 0.0, "max_levels_per_group": 0}
    for name, mod in model.named_modules():
        args = getattr(getattr(mod, "quantization_scheme", None), "weights", None)
        if args is None or not hasattr(mod, "weight_scale"):
            continue
        w = mod.weight.detach()
        dq = fake_quantize(w, mod.weight_scale, getattr(mod, "weight_zero_point", None), args).to(w.dtype)
        checks["quantized_linears"] += 1
        checks["max_abs_weight_vs_fake_quant"] = max(checks["max_abs_weight_vs_fake_quant"], (w.float() - dq.float()).abs().max().item())
        groups = dq.float().reshape(dq.shape[0], -1, args.group_size)
        levels = max(len(torch.unique(g)) for g in groups[:4].reshape(-1, args.group_size))
        checks["max_levels_per_group"] = max(checks["max_levels_per_group"], levels)
        out[f"{name}.weight"] = dq
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[-1] in quant_params or k in out:
            continue
        out[k] = v.detach()
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in out:
        if torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"]):
            del out["lm_head.weight"]  # tied: transformers rebuilds it from the embeddings
    if checks["max_levels_per_group"] > 2 ** bits:
        raise SystemExit(f"a group holds {checks['max_levels_per_group']} levels, more than {2 ** bits}")
    return {k: v.contiguous() for k, v in out.items()}, checks


def write_folder(src: Path, dst: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})


def perplexity(folder: Path, ids: torch.Tensor, seqlen: int) -> float:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, ids.numel() - 1, seqlen):
            chunk = ids[i:i + seqlen + 1].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            logits = m(chunk[:, :-1]).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            n += chunk.shape[1] - 1
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a bf16 HF folder (the real model)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--no-dense-save", action="store_true", help="skip the save_compressed=False comparison")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    a.out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(a.model))
    ds = calibration_set(tok, a.samples, a.seqlen)
    heldout = torch.tensor(tok(docstrings(HELDOUT_MODULES)).input_ids[: a.eval_tokens + 1])
    res = {"versions": {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                        "torch": torch.__version__}, "workarounds": cpu_only_workarounds(),
           "calibration": {"samples": a.samples, "seqlen": a.seqlen, "modules": CALIBRATION_MODULES},
           "scheme": {"bits": a.bits, "group_size": a.group_size, "symmetric": False, "targets": ["Linear"], "ignore": ["lm_head"]},
           "threads": torch.get_num_threads(), "methods": {}}
    probe = a.out / "probe.json"
    if probe.exists():  # methods measured by an earlier run with the same settings are kept
        old = json.loads(probe.read_text())
        if old.get("calibration") == res["calibration"] and old.get("scheme") == res["scheme"]:
            res["methods"] = old.get("methods", {})
    res["perplexity_source"] = perplexity(a.model, heldout, 256)
    logger.info("source perplexity on held-out docstrings: %.3f", res["perplexity_source"])
    for method in a.methods:
        model = AutoModelForCausalLM.from_pretrained(str(a.model), dtype=torch.float32)
        t0 = time.perf_counter()
        model = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe(method, a.bits, a.group_size),
                        num_calibration_samples=a.samples, max_seq_length=a.seqlen, shuffle_calibration_samples=False)
        secs = time.perf_counter() - t0
        state, checks = dequantized_state(model, a.bits)
        folder = a.out / method
        write_folder(a.model, folder, state)
        r = {"oneshot_s": round(secs, 1), "peak_rss_mb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
             "folder": str(folder), **checks}
        if not a.no_dense_save:
            dense = a.out / f"{method}-dense"
            if dense.exists():
                shutil.rmtree(dense)
            model.save_pretrained(str(dense), save_compressed=False)
            saved = {}
            for f in dense.glob("*.safetensors"):
                saved.update(load_file(str(f)))
            diffs = [(saved[k].float() - v.float()).abs().max().item() for k, v in state.items() if k in saved]
            qcfg = json.loads((dense / "config.json").read_text()).get("quantization_config", {})
            r["dense_save"] = {"folder": str(dense), "tensors": len(saved), "shared_with_ours": len(diffs),
                               "max_abs_diff_vs_ours": max(diffs) if diffs else None,
                               "extra_tensors": sorted(k for k in saved if k not in state)[:6],
                               "quantization_config_format": qcfg.get("format"), "quant_method": qcfg.get("quant_method")}
        del model
        r["perplexity"] = perplexity(folder, heldout, 256)
        r["perplexity_loss_pct"] = round(100 * (r["perplexity"] / res["perplexity_source"] - 1), 2)
        res["methods"][method] = r
        logger.info("%s: %s", method, json.dumps(r))
        probe.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
