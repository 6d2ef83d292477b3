"""`LayerQuantizer`: quantize and dequantize the tensors of one layer with a plan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from cache.codecs import CodecName, RawCodec, decode_tensor, get_codec, tensor_error
from cache.record import EncodedTensor, dtype_from_name
from sli.config import AdaptiveQuantizer, QuantizationConfig, QuantizationMode, QuantizationPlan

_RAW = RawCodec()


@dataclass(frozen=True)
class TensorStats:
    """Per-tensor cost of quantization."""

    original_bytes: int
    encoded_bytes: int
    rel_mse: float
    max_abs_err: float


class LayerQuantizer:
    """Applies a plan (a :class:`QuantizationConfig` or an :class:`AdaptiveQuantizer`) tensor by tensor.

    Args:
        plan: which codec each tensor gets; default NF4.
    """

    def __init__(self, plan: QuantizationPlan | None = None) -> None:
        self.plan: QuantizationConfig | AdaptiveQuantizer = plan if plan is not None else QuantizationConfig()

    def quantize_tensor(self, name: str, tensor: torch.Tensor, *, measure: bool = True) -> tuple[EncodedTensor, TensorStats]:
        """Encode one tensor; measure its error against the input when ``measure``."""
        choice = self.plan.choose(name, tensor)
        unmeasured = {"rel_mse": 0.0, "max_abs_err": 0.0}
        if choice.codec is CodecName.RAW:
            enc = _RAW.encode(tensor, storage_dtype=self.plan.torch_compute_dtype(tensor.dtype))
            enc.dtype = str(tensor.dtype).removeprefix("torch.")
            lossless = enc.parts["data"].dtype == tensor.dtype
            err = tensor_error(tensor, decode_tensor(enc, tensor.dtype)) if measure and not lossless else unmeasured
        elif measure:  # the codec measures while it encodes where it can
            enc, err = get_codec(choice.codec).encode_measured(tensor, **choice.params)
        else:
            enc, err = get_codec(choice.codec).encode(tensor, **choice.params), unmeasured
        stats = TensorStats(
            original_bytes=tensor.numel() * tensor.element_size(),
            encoded_bytes=enc.nbytes,
            rel_mse=err["rel_mse"],
            max_abs_err=err["max_abs_err"],
        )
        return enc, stats

    def quantize_layer(self, layer: nn.Module | Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, EncodedTensor]:
        """Encode every parameter of a module (or every tensor of a state dict).

        Names are ``prefix + local name``; the prefix lets skip lists match (e.g. ``"lm_head."``).
        """
        items = layer.state_dict().items() if isinstance(layer, nn.Module) else layer.items()
        return {prefix + k: self.quantize_tensor(prefix + k, v.detach(), measure=False)[0] for k, v in items}

    def dequantize_layer(
        self,
        encoded: Mapping[str, EncodedTensor],
        module: nn.Module | None = None,
        *,
        dtype: torch.dtype | None = None,
        prefix: str = "",
    ) -> dict[str, torch.Tensor]:
        """Decode tensors (to ``dtype``, default each one's original dtype); when ``module`` is
        given, load them into it (names stripped of ``prefix``)."""
        out = {k: decode_tensor(e, dtype or dtype_from_name(e.dtype)) for k, e in encoded.items()}
        if module is not None:
            local = {k.removeprefix(prefix): v for k, v in out.items()}
            module.load_state_dict(local, strict=True, assign=True)
        return out

    @staticmethod
    def is_quantized(encoded: EncodedTensor | Mapping[str, EncodedTensor]) -> bool:
        """True when any tensor uses a codec other than raw."""
        items = [encoded] if isinstance(encoded, EncodedTensor) else list(encoded.values())
        return any(e.codec != CodecName.RAW.value for e in items)

    @staticmethod
    def get_quantized_size_ratio(encoded: EncodedTensor | Mapping[str, EncodedTensor]) -> float:
        """Encoded bytes over original bytes (original = numel * original element size)."""
        items = [encoded] if isinstance(encoded, EncodedTensor) else list(encoded.values())
        orig = sum(e.numel * torch.empty(0, dtype=dtype_from_name(e.dtype)).element_size() for e in items)
        return sum(e.nbytes for e in items) / orig if orig else 1.0


def _plan_for(mode: str | QuantizationMode | QuantizationConfig | AdaptiveQuantizer) -> QuantizationConfig | AdaptiveQuantizer:
    if isinstance(mode, (QuantizationConfig, AdaptiveQuantizer)):
        return mode
    # a bare layer has no lm_head/embeddings: quantize everything 2-D it holds
    return QuantizationConfig(mode=QuantizationMode(mode), llm_int8_skip_modules=[])


def quantize_layer(layer: nn.Module | Mapping[str, torch.Tensor], mode: str | QuantizationMode = "nf4") -> dict[str, EncodedTensor]:
    """Quantize a module's tensors with one mode; see :meth:`LayerQuantizer.quantize_layer`."""
    return LayerQuantizer(_plan_for(mode)).quantize_layer(layer)


def dequantize_layer(
    encoded: Mapping[str, EncodedTensor], module: nn.Module | None = None, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Decode what :func:`quantize_layer` produced, optionally into ``module``."""
    return LayerQuantizer().dequantize_layer(encoded, module, dtype=dtype)
