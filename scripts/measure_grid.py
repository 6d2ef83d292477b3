#!/usr/bin/env python3
"""Why int4 with the group's minimum as offset (sli's encoder before record format 3) loses
more perplexity than an integer zero point although its weight error is lower.

Walks the unquantized model layer by layer on calibration samples (the shipped text) and,
for every linear of the decoder layers, compares two grids of the same group size (codes,
fp16 scale and offset, the same decoder formula ``q * scale + offset``):

- ``min``: ``offset = min``, ``scale = (max - min) / 15``: the grid spans the group exactly and
  zero falls anywhere between two codes;
- ``zp``: ``offset = -round(-min / scale) * scale`` (integer zero point; sli's encoder now).

Per grid: the weights' relative MSE; the relative output error on the calibration inputs,
``tr(dW H dW^T) / tr(W H W^T)`` with ``H = mean(x x^T)``; the part of it that the *mean* of
each group's error explains (``dW`` replaced by its group means: a bias shared by the group,
which adds coherently over inputs whose channels do not average to zero); and the share of
small weights (|w| < scale / 2) that decode with the opposite sign. Then the perplexity of each
grid on the held-out pydoc text. Writes ``docs/results/int4_grid.md`` and ``.json``.

    python scripts/measure_grid.py SmolLM2-135M-Instruct --group-size 64 --samples 16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def grid_min(g: torch.Tensor):
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp_min(1e-8).half().float()
    o = lo.half().float()
    return s, o


def grid_zp(g: torch.Tensor):
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 15).clamp_min(1e-8).half().float()
    return s, (-torch.round(-lo / s).clamp(0, 15) * s).half().float()


def dequant(w: torch.Tensor, gs: int, grid, with_scale: bool = False):
    g = w.float().reshape(w.shape[0], -1, gs)
    s, o = grid(g)
    wq = (torch.round((g - o) / s).clamp(0, 15) * s + o).reshape(w.shape)
    return (wq, s.expand(-1, -1, gs).reshape(w.shape)) if with_scale else wq


def stats(w: torch.Tensor, gs: int, grid, h: torch.Tensor) -> dict[str, float]:
    wq, scale = dequant(w, gs, grid, with_scale=True)
    d = wq - w
    dm = d.reshape(d.shape[0], -1, gs).mean(-1, keepdim=True).expand(-1, -1, gs).reshape(d.shape)
    den = float(((w @ h) * w).sum())
    small = w.abs() < scale / 2
    flips = ((torch.sign(wq) != torch.sign(w)) & (wq != 0) & small).sum() / max(int(small.sum()), 1)
    return {"rel_mse": float(d.pow(2).sum() / w.pow(2).sum()), "out_err": float(((d @ h) * d).sum()) / den,
            "out_err_group_mean": float(((dm @ h) * dm).sum()) / den, "sign_flips_small": float(flips)}


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from runtime.arch import get_arch
    from runtime.evaluate import default_text, perplexity
    from sli.offline.calibrate import source_tokenizer
    from sli.offline.calibration import CalibrationConfig, calibration_set
    from sli.offline.fetch import resolve_model
    from sli.offline.layerwalk import Walker
    from sli.offline.sources import open_source

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--out", default="docs/results")
    a = ap.parse_args()
    path = resolve_model(a.model)
    src = open_source(path)
    tok = source_tokenizer(src)
    cal = CalibrationConfig(samples=a.samples, seqlen=512)
    ids = calibration_set(cal, tok).samples
    arch = get_arch(src.config.model_type)
    walker = Walker(src.config, arch, 512)
    emb = src.read(f"{arch.embed}.weight").float()
    x = torch.empty(ids.shape[0], 512, int(src.config.hidden_size))
    walker.embed(ids, lambda u: emb[u], {}, x)
    per: dict[str, dict[str, dict[str, float]]] = {}
    gs = a.group_size
    for i in range(src.config.num_hidden_layers):
        prefix = walker.layer_prefix(i)
        names = [n for n in src.tensor_names() if n.startswith(prefix + ".")]
        layer = walker.load(i, {n: src.read(n).float() for n in names})
        groups = walker.linear_groups(i, x)
        y = torch.empty_like(x)
        st = walker.collect(i, x, groups, hessian=True, stop=False, out=y)
        for g in groups:
            for n in g:
                w = layer.get_submodule(n).weight.detach()
                per[f"{prefix}.{n}"] = {k: stats(w, gs, grid, st[n].hessian) for k, grid in (("min", grid_min), ("zp", grid_zp))}
        walker.unload(i)
        x = y
        print(f"layer {i} done", file=sys.stderr, flush=True)
    from transformers import AutoModelForCausalLM

    ev = torch.tensor(tok(default_text())["input_ids"][: a.eval_tokens])
    ppl = {}
    for k, grid in (("fp32", None), ("min", grid_min), ("zp", grid_zp)):
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        if grid is not None:
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if ".layers." in n and n.endswith("proj.weight"):
                        p.copy_(dequant(p.detach(), gs, grid))
        ppl[k] = perplexity(m, ev, max_length=512, stride=256).perplexity
    mean = {k: {s: sum(v[k][s] for v in per.values()) / len(per) for s in ("rel_mse", "out_err", "out_err_group_mean", "sign_flips_small")}
            for k in ("min", "zp")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int4_grid.json").write_text(json.dumps({"group_size": gs, "samples": a.samples, "perplexity": ppl, "mean": mean, "per_linear": per}, indent=1))
    lines = [
        f"# int4 groups of {gs}: the group's minimum as offset against an integer zero point (`scripts/measure_grid.py`)", "",
        f"`{path.name}`, {len(per)} linears of the decoder layers; statistics on {a.samples} x 512 calibration tokens "
        f"(`sli/data/calibration.txt`); perplexity on the first {a.eval_tokens} tokens of the pydoc topics "
        "(windows of 512, stride 256), fp32.", "",
        "| grid | perplexity | loss % | weight rel. MSE | output rel. error | of it from group-mean error | small weights decoded with flipped sign |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in ("min", "zp"):
        m = mean[k]
        lines.append(f"| {'offset = group min' if k == 'min' else 'integer zero point'} | {ppl[k]:.4f} | {100 * (ppl[k] / ppl['fp32'] - 1):+.2f} | "
                     f"{m['rel_mse']:.3e} | {m['out_err']:.3e} | {m['out_err_group_mean']:.3e} ({100 * m['out_err_group_mean'] / m['out_err']:.0f}%) | "
                     f"{100 * m['sign_flips_small']:.1f}% |")
    lines.append(f"| unquantized | {ppl['fp32']:.4f} | | | | | |")
    (out / "int4_grid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
