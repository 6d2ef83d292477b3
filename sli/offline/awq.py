"""Activation-aware scaling (AWQ, Lin et al., 2023), folded into the model's own weights.

Input channel ``k`` of a linear that sees large activations ``|x_k|`` matters more to its
output; scaling the weight's column up by ``s_k`` and the input down by ``1 / s_k`` leaves the
product unchanged but gives that column a finer grid. The scales are
``s = mean|x|^alpha`` (normalised so ``max(s) * min(s) = 1``; with "duo scaling", the
default, divided by the weights' relative magnitude to the power ``1 - alpha``, as AutoAWQ and
llm-compressor do); ``alpha`` is chosen on a grid
of ``awq_grid`` points in ``[0, 1)`` by the output error of the block that contains the
linears, quantized with the plan's codec, on the calibration activations.

``1 / s`` is folded into whatever produces the linears' input, so the graph stays
transformers' own: the RMSNorm before ``q/k/v`` and before ``gate/up`` (Gemma's norm computes
``x * (1 + w)``: ``w`` becomes ``(1 + w) / s - 1``), ``v_proj``'s rows before ``o_proj`` (with
grouped-query attention, one scale per key/value channel, shared by the query heads that read
it), ``up_proj``'s rows before ``down_proj``. Without quantization the folded model computes
the same function (tested: logits within 1e-4 in float32).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


class AWQFoldError(ValueError):
    """AWQ's scales cannot be folded into this architecture."""


@dataclass(frozen=True)
class ScalePoint:
    """One place scales go: ``prev`` (a norm or a linear, relative to the layer) produces the
    input of ``linears``; ``inspect`` is the block whose output error chooses ``alpha``."""

    prev: str
    linears: tuple[str, ...]
    inspect: str
    kind: str  # "norm", "gemma_norm" or "linear"


def _llama_like(norm: str, mlp_norm: str) -> tuple[ScalePoint, ...]:
    return (
        ScalePoint("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", norm),
        ScalePoint("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", "linear"),
        ScalePoint(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp", norm),
        ScalePoint("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "linear"),
    )


_FAMILIES: dict[str, tuple[ScalePoint, ...]] = {
    "llama": _llama_like("norm", "post_attention_layernorm"),
    "mistral": _llama_like("norm", "post_attention_layernorm"),
    "qwen2": _llama_like("norm", "post_attention_layernorm"),
    "qwen3": _llama_like("norm", "post_attention_layernorm"),
    "gemma": _llama_like("gemma_norm", "post_attention_layernorm"),
    "gemma2": _llama_like("gemma_norm", "pre_feedforward_layernorm"),
}


def scale_points(model_type: str) -> tuple[ScalePoint, ...]:
    """Where AWQ folds its scales in a layer of ``model_type``.

    Raises:
        AWQFoldError: an architecture sli does not fold into, named with those it does.
    """
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise AWQFoldError(
            f"AWQ cannot fold its scales into a {model_type!r} model: sli folds them into {sorted(_FAMILIES)} "
            "(norm -> q/k/v, v -> o, norm -> gate/up, up -> down); use --calibrate gptq for this model"
        ) from None


def _kv_expand(layer: nn.Module, width: int) -> tuple[int, int]:
    """(key/value width, query heads per key/value head) for a v_proj -> o_proj fold."""
    v = layer.get_submodule("self_attn.v_proj")
    kv = v.out_features
    if width % kv:
        raise AWQFoldError(f"o_proj takes {width} channels, not a multiple of v_proj's {kv}: cannot fold")
    return kv, width // kv


def fold(layer: nn.Module, point: ScalePoint, s: torch.Tensor) -> None:
    """Multiply the linears' input columns by ``s`` and divide what produces their input by it
    (in place; ``s`` is one scale per input channel of the linears)."""
    prev = layer.get_submodule(point.prev)
    with torch.no_grad():
        if point.kind == "linear":
            s_prev = s
            if point.prev.endswith("v_proj"):
                kv, rep = _kv_expand(layer, s.numel())
                if rep > 1:  # query heads reading one kv head share its scales: take them once
                    hd = head_dim_of(layer)
                    s_prev = s.view(kv // hd, rep, hd)[:, 0, :].reshape(-1)
            prev.weight.div_(s_prev[:, None])
            if prev.bias is not None:
                prev.bias.div_(s_prev)
        elif point.kind == "gemma_norm":
            prev.weight.copy_((1.0 + prev.weight) / s - 1.0)
        else:
            prev.weight.div_(s)
        for name in point.linears:
            layer.get_submodule(name).weight.mul_(s[None, :])


def head_dim_of(layer: nn.Module) -> int:
    attn = layer.get_submodule("self_attn")
    hd = getattr(attn, "head_dim", None)
    if not isinstance(hd, int):
        raise AWQFoldError(f"{type(attn).__name__} has no head_dim: cannot share scales between grouped query heads")
    return hd


def _expand_kv(s_kv: torch.Tensor, rep: int, head_dim: int) -> torch.Tensor:
    """Per-kv-channel scales -> per o_proj input channel: query head h reads kv head h // rep."""
    kv_heads = s_kv.numel() // head_dim
    return s_kv.view(kv_heads, 1, head_dim).expand(kv_heads, rep, head_dim).reshape(-1)


def search_point(
    layer: nn.Module,
    point: ScalePoint,
    x: torch.Tensor,
    quantize: Callable[[str, torch.Tensor], torch.Tensor],
    run_inspect: Callable[[torch.Tensor], torch.Tensor],
    *,
    grid: int,
    duo: bool = True,
    group_size: int | None = None,
) -> tuple[float, torch.Tensor, float, float]:
    """Choose ``alpha`` for one point: returns ``(alpha, scales, error at alpha, error at alpha=0)``.

    Args:
        x: the linears' input ``[samples, L, in]`` (float32).
        duo: AWQ's "duo scaling" (AutoAWQ, llm-compressor's default): ``s = mean|x|^alpha /
            mean|w|^(1 - alpha)``, ``mean|w|`` the weights' magnitude per input channel relative
            to their group's maximum (``group_size``; a row when None). Without it ``s =
            mean|x|^alpha`` and ``alpha = 0`` is plain round to nearest.
        quantize: linear name, weight -> the weight quantized and dequantized with its codec
            (the identity for a linear the plan keeps).
        run_inspect: the block's output for an input: a tensor, or a list of them (micro-batches).
    """
    linears = [layer.get_submodule(n) for n in point.linears]
    originals = [m.weight.detach().clone() for m in linears]
    x_mean = x.reshape(-1, x.shape[-1]).abs().mean(0)  # [in]
    rep = head_dim = 1
    if point.kind == "linear" and point.prev.endswith("v_proj"):
        _, rep = _kv_expand(layer, x.shape[-1])
        if rep > 1:  # one scale per kv channel: average over the query heads that read it
            head_dim = head_dim_of(layer)
            x_mean = x_mean.view(-1, rep, head_dim).mean(1).reshape(-1)
    w_mean = None
    if duo:
        w = torch.cat(originals).abs()  # [sum of rows, in]
        gs = group_size if group_size and w.shape[1] % group_size == 0 else w.shape[1]
        w = (w.view(w.shape[0], -1, gs) / (w.view(w.shape[0], -1, gs).amax(dim=2, keepdim=True) + 1e-6)).view_as(w)
        w_mean = w.mean(0)
        if rep > 1:
            w_mean = w_mean.view(-1, rep, head_dim).mean(1).reshape(-1)
    def outputs(t: torch.Tensor) -> list[torch.Tensor]:
        y = run_inspect(t)
        return list(y) if isinstance(y, (list, tuple)) else [y]

    with torch.no_grad():
        ref = outputs(x)
    numel = sum(r.numel() for r in ref)
    best = (float("inf"), 0.0, None)
    err0 = None
    try:
        for k in range(grid):
            alpha = k / grid
            s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4) if duo else x_mean.pow(alpha)).clamp_min(1e-4)
            s = s / (s.max() * s.min()).sqrt()
            s_full = _expand_kv(s, rep, head_dim) if rep > 1 else s
            with torch.no_grad():
                for m, w0, n in zip(linears, originals, point.linears):
                    m.weight.copy_(quantize(n, w0 * s_full[None, :]) / s_full[None, :])
            with torch.no_grad():
                err = sum(float((a - b).pow(2).sum()) for a, b in zip(outputs(x), ref)) / numel
            if k == 0:
                err0 = err
            if err < best[0]:
                best = (err, alpha, s_full.clone())
    finally:
        with torch.no_grad():
            for m, w0 in zip(linears, originals):
                m.weight.copy_(w0)
    if best[2] is None:
        raise ValueError(f"AWQ search for {point.linears} found no finite error (the block's output is not finite)")
    return best[1], best[2], best[0], err0
