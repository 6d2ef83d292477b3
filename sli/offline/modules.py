"""Quantized modules: layers in, quantized layers out (what :mod:`sli.quantization` documents).

A :class:`QuantizedLinear` holds the encoding :class:`~sli.offline.quantizer.TensorQuantizer`
makes, the same bytes the cache stores, and computes as a streamed layer does: the codecs of
:mod:`cache.codecs` and the packed int4 kernel of :mod:`runtime.kernels`.

Sizes: :meth:`LayerQuantizer.get_quantized_size_ratio` compares the quantized bytes with the
same layer in its compute dtype (float16 unless set), the document's 16-bit baseline: NF4
gives about 0.25, INT8 about 0.5.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from cache.codecs import CodecName, decode_rows, decode_tensor
from cache.record import EncodedTensor, dtype_from_name, dtype_name
from runtime.kernels import Int4CpuKernel, PackedInt4
from sli.offline.config import QuantizationConfig, QuantizationMode, QuantizationPlan
from sli.offline.quantizer import TensorQuantizer

logger = logging.getLogger("sli.quantization")  # the documented logger name

DEFAULT_COMPUTE_DTYPE = torch.float16  # the document's default, for layers quantized on their own



def _param_name(part: str) -> str:
    return "weight_" + part.replace(":", "__").replace(".", "_")


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is held as a codec's encoding (the same bytes the cache
    stores) and computes in ``compute_dtype``: inputs are cast to it, the output is cast
    back to the input's dtype.

    The int4 codec computes on its packed codes with torch's CPU int4 kernel when the compute
    dtype is bfloat16 (the kernel's layout is derived once, checked against the dequantized
    weight, and kept beside the codes); every other case dequantizes the weight for the
    matmul, as a streamed layer does.

    The encoded parts are parameters (``weight_<part>``, no gradient), so ``parameters()``
    counts them and ``.to(device)`` moves them.
    """

    def __init__(self, encoded: EncodedTensor, bias: torch.Tensor | None, *, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if len(encoded.shape) != 2:
            raise ValueError(f"a quantized linear needs a 2-D weight, got shape {encoded.shape}")
        self.out_features, self.in_features = encoded.shape
        self.codec = encoded.codec
        self.codec_params = dict(encoded.params)
        self.original_dtype = dtype_from_name(encoded.dtype)
        self.compute_dtype = compute_dtype
        self._parts = list(encoded.parts)
        for key, t in encoded.parts.items():
            self.register_parameter(_param_name(key), nn.Parameter(t, requires_grad=False))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self._packed: PackedInt4 | None = None

    @property
    def encoded(self) -> EncodedTensor:
        """The weight's encoding (views of this module's parameters)."""
        parts = {k: getattr(self, _param_name(k)).data for k in self._parts}
        return EncodedTensor(self.codec, (self.out_features, self.in_features), dtype_name(self.original_dtype), parts, self.codec_params)

    @property
    def quantized_bytes(self) -> int:
        """Bytes of the encoding plus the bias."""
        return self.encoded.nbytes + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight decoded to ``dtype`` (default the compute dtype)."""
        return decode_tensor(self.encoded, dtype or self.compute_dtype)

    def _packed_kernel(self, x: torch.Tensor) -> PackedInt4 | None:
        if (
            self.compute_dtype != torch.bfloat16
            or self.codec != CodecName.INT4_GROUP.value
            or x.device.type != "cpu"
            or not Int4CpuKernel.available()
            or not Int4CpuKernel.eligible((self.out_features, self.in_features), self.codec_params)
        ):
            return None
        if self._packed is None:
            Int4CpuKernel.prove()
            enc = self.encoded
            packed = Int4CpuKernel.pack(enc)
            Int4CpuKernel.check(enc, packed, f"a {self.out_features}x{self.in_features} quantized linear")
            self._packed = packed
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_kernel(x)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if packed is not None:
            y = Int4CpuKernel.matmul(x.to(torch.bfloat16).contiguous(), packed)
            if bias is not None:
                y = y + bias
        else:
            y = F.linear(x.to(self.compute_dtype), self.dequantized_weight(), bias)
        return y.to(x.dtype)

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` moves the encoding; a dtype cast (``.half()``, ``.to(torch.bfloat16)``)
        leaves its parts as they are, since casting them would change the stored codes and
        scales: the layer keeps computing in its compute dtype."""
        parts = {_param_name(k): self._parameters.pop(_param_name(k)) for k in self._parts}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, p in parts.items():
                moved = fn(p.data)
                self._parameters[name] = nn.Parameter(
                    moved if moved.dtype == p.dtype else p.data.to(moved.device), requires_grad=False
                )
        self._packed = None  # derived again on first use, where the codes now are
        return self

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight in ``dtype`` (default the compute dtype)."""
        dtype = dtype or self.compute_dtype
        w = self.dequantized_weight(dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=dtype)
        lin.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"codec={self.codec}, compute_dtype={self.compute_dtype}"
        )


class QuantizedEmbedding(nn.Module):
    """Token embeddings held as a row-wise encoding (int8 rows by default, as the cache stores
    them): each lookup decodes only the rows it needs, as the streamed model does."""

    def __init__(self, encoded: EncodedTensor, padding_idx: int | None, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = encoded.shape
        self.padding_idx = padding_idx
        self.codec, self.codec_params, self.dtype = encoded.codec, dict(encoded.params), dtype
        self._enc = encoded

    @property
    def encoded(self) -> EncodedTensor:
        return self._enc

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = decode_rows(self._enc, ids.reshape(-1).long().cpu(), self.dtype)
        return rows.to(ids.device).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, codec={self.codec}, dtype={self.dtype}"


def _resolve_compute_dtype(asked: torch.dtype | str | None, weight_dtype: torch.dtype) -> torch.dtype:
    if asked is None:
        return DEFAULT_COMPUTE_DTYPE
    return weight_dtype if asked == "auto" else asked


def _children(module: nn.Module, prefix: str, kind: type = nn.Linear) -> Iterable[tuple[str, nn.Module, str, nn.Module]]:
    """(full name, parent, attribute, child) for every ``kind`` module below ``module``, listed
    before any is replaced."""
    for name, parent in list(module.named_modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, kind):
                local = f"{name}.{attr}" if name else attr
                yield (f"{prefix}.{local}" if prefix else local), parent, attr, child


class LayerQuantizer:
    """Quantizes and dequantizes layers with one plan.

    Args:
        config: a :class:`QuantizationConfig` (or an :class:`AdaptiveQuantizer`, which picks
            a config per linear by its name). Default: ``QuantizationConfig()`` (mode ``NONE``).
    """

    def __init__(self, config: QuantizationConfig | QuantizationPlan | None = None) -> None:
        self.config: QuantizationConfig | QuantizationPlan = config if config is not None else QuantizationConfig()
        self._tensors = TensorQuantizer(self.config)

    def _quantize_linear(self, name: str, linear: nn.Linear) -> nn.Module:
        """A :class:`QuantizedLinear` for ``linear``, or ``linear`` itself when the plan keeps it."""
        weight_name = f"{name}.weight" if name else "weight"
        w = linear.weight.detach()
        if w.device.type == "meta":
            raise ValueError(f"{name or 'the layer'} has no weights (meta device); load them before quantizing")
        choice = self.config.choose(weight_name, w)
        if choice.codec is CodecName.RAW:
            return linear
        enc, _ = self._tensors.quantize_tensor(weight_name, w.cpu() if w.device.type != "cpu" else w, measure=False)
        dtype = _resolve_compute_dtype(self.config.compute_dtype_for(weight_name), w.dtype)
        logger.debug("quantized %s: %s, %d -> %d bytes, computes in %s", name or "a linear", enc.codec,
                     w.numel() * w.element_size(), enc.nbytes, dtype)
        return QuantizedLinear(enc, linear.bias, compute_dtype=dtype)

    def quantize_layer(self, layer: nn.Module, layer_name: str = "") -> nn.Module:
        """Quantize a layer according to the configured mode.

        An ``nn.Linear`` gives a new :class:`QuantizedLinear` (or itself when skipped, or in
        mode ``NONE``); any other module has the linears inside it replaced in place, and is
        returned. ``layer_name`` is the layer's dotted name in its model (e.g.
        ``"model.layers.0.self_attn"``): the skip list and the adaptive layer typing match on it.
        """
        if isinstance(layer, nn.Linear):
            return self._quantize_linear(layer_name, layer)
        for full, parent, attr, child in _children(layer, layer_name):
            q = self._quantize_linear(full, child)
            if q is not child:
                setattr(parent, attr, q)
        return layer

    def dequantize_layer(self, layer: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
        """De-quantize a layer back to full precision: a :class:`QuantizedLinear` gives an
        ``nn.Linear``; in any other module the quantized linears are replaced in place.
        Weights come back in ``compute_dtype``, else the config's, else each layer's own."""
        dtype = compute_dtype if compute_dtype is not None else (
            self.config.compute_dtype if isinstance(self.config.compute_dtype, torch.dtype) else None
        )
        if isinstance(layer, QuantizedLinear):
            return layer.to_linear(dtype)
        for _, parent, attr, child in _children(layer, "", QuantizedLinear):
            setattr(parent, attr, child.to_linear(dtype))
        return layer

    @staticmethod
    def is_quantized(layer: nn.Module) -> bool:
        """Whether the layer is, or holds, a quantized linear."""
        return any(isinstance(m, QuantizedLinear) for m in layer.modules())

    @staticmethod
    def get_quantized_size_ratio(layer: nn.Module) -> float:
        """Bytes of the layer as quantized over bytes of the same layer in its compute dtype
        (quantized linears counted at ``numel`` times their compute dtype's size, everything
        else as it is): 0.25 is 4x smaller than 16-bit; 1.0 when nothing is quantized."""
        quantized = original = 0
        inner: set[int] = set()
        for m in layer.modules():
            if isinstance(m, QuantizedLinear):
                esize = torch.empty(0, dtype=m.compute_dtype).element_size()
                quantized += m.quantized_bytes
                original += (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)) * esize
                inner.update(id(p) for p in m.parameters())
        for p in layer.parameters():
            if id(p) not in inner:
                quantized += p.numel() * p.element_size()
                original += p.numel() * p.element_size()
        return quantized / original if original else 1.0


def quantize_model_linears(model: nn.Module, plan: QuantizationConfig | QuantizationPlan, *, progress: bool = False) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` in place, by its name, for a quantized module with
    the config the plan picks (kept ones stay); returns ``model``."""
    quantizer = LayerQuantizer(plan)
    before = after = swapped = 0
    linears = list(_children(model, ""))
    for full, parent, attr, child in list(_children(model, "", nn.Embedding)):
        # the token embeddings, stored as rows (the cache's vocabulary codec), looked up row by row
        w = child.weight.detach()
        if quantizer.config.choose(f"{full}.weight", w).codec is CodecName.RAW:
            continue
        enc, _ = quantizer._tensors.quantize_tensor(f"{full}.weight", w.cpu(), measure=False)
        before += w.numel() * w.element_size()
        after += enc.nbytes
        setattr(parent, attr, QuantizedEmbedding(enc, child.padding_idx, dtype=w.dtype))
        swapped += 1
    for full, parent, attr, child in tqdm(linears, desc="quantize", unit="linear", disable=not progress):
        q = quantizer._quantize_linear(full, child)
        if q is child:
            continue
        before += child.weight.numel() * child.weight.element_size()
        after += q.encoded.nbytes
        setattr(parent, attr, q)
        swapped += 1
    logger.info(
        "quantized %d of %d linears: %.1f MB -> %.1f MB of weights", swapped, len(linears), before / 1e6, after / 1e6
    )
    return model


def _config_for(mode: str | QuantizationMode | QuantizationPlan, kwargs: dict[str, Any]):
    if hasattr(mode, "choose"):  # a QuantizationConfig or an AdaptiveQuantizer
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} given together with a config; set them on the config")
        return mode
    return QuantizationConfig(mode=QuantizationMode(mode), **kwargs)


def quantize_layer(
    layer: nn.Module, mode: str | QuantizationMode | QuantizationConfig | QuantizationPlan = "int8", **kwargs: Any
) -> nn.Module:
    """One-line layer quantization: ``quantize_layer(layer, mode="nf4", compute_dtype=torch.bfloat16)``.
    ``kwargs`` are :class:`QuantizationConfig` fields (``layer_name`` is passed on)."""
    layer_name = kwargs.pop("layer_name", "")
    return LayerQuantizer(_config_for(mode, kwargs)).quantize_layer(layer, layer_name)


def dequantize_layer(layer: nn.Module, compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> nn.Module:
    """One-line layer dequantization, to ``compute_dtype`` (float16 by default, as documented)."""
    return LayerQuantizer().dequantize_layer(layer, compute_dtype)

