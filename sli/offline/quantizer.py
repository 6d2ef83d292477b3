"""`TensorQuantizer`: one tensor through the codec a plan picks for it, with its measured error.

The writer quantizes a model with this, tensor by tensor; the documented module-level API
(:class:`sli.quantization.LayerQuantizer`) builds its quantized modules on it too, so both
store exactly the same encodings.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from cache.codecs import CodecName, RawCodec, get_codec
from cache.record import EncodedTensor
from sli.offline.config import CodecChoice, QuantizationPlan

_RAW = RawCodec()


def _installed(name: str) -> bool:
    """Whether a package can be imported, without importing it (bitsandbytes logs warnings on import)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[name] is None (import blocked)
        return False


# bitsandbytes runs on CPU; the int8 (LLM.int8), nf4 and fp4 codecs are its own
BITSANDBYTES_AVAILABLE = _installed("bitsandbytes")

BITSANDBYTES_CODECS = {CodecName.INT8_OUTLIER: "int8", CodecName.NF4: "nf4", CodecName.FP4: "fp4"}


def require_bitsandbytes(codec: CodecName) -> None:
    """Raises ImportError naming the install command when ``codec`` needs bitsandbytes and it is missing."""
    if codec in BITSANDBYTES_CODECS and not BITSANDBYTES_AVAILABLE:
        raise ImportError(
            f"bitsandbytes is required for {BITSANDBYTES_CODECS[codec]} quantization; "
            "install it: pip install 'bitsandbytes>=0.41.0'"
        )


@dataclass(frozen=True)
class TensorStats:
    """Per-tensor cost of quantization."""

    original_bytes: int
    encoded_bytes: int
    rel_mse: float
    max_abs_err: float


class TensorQuantizer:
    """Applies a plan (a ``QuantizationConfig`` or an ``AdaptiveQuantizer``) tensor by tensor.

    Tensors the plan keeps are stored as they are, in the source's dtype (lossless): the
    compute dtype is chosen when the model runs, not here.
    """

    def __init__(self, plan: QuantizationPlan) -> None:
        self.plan = plan

    def quantize_tensor(self, name: str, tensor: torch.Tensor, *, measure: bool = True,
                        choice: CodecChoice | None = None) -> tuple[EncodedTensor, TensorStats]:
        """Encode one tensor (with the plan's choice for it, or ``choice``); measure the error of
        its float32 decode against the input when ``measure``."""
        choice = choice or self.plan.choose(name, tensor)
        require_bitsandbytes(choice.codec)
        err = {"rel_mse": 0.0, "max_abs_err": 0.0}
        if choice.codec is CodecName.RAW:
            enc = _RAW.encode(tensor)
        elif measure:  # the codec measures while it encodes where it can
            enc, err = get_codec(choice.codec).encode_measured(tensor, **choice.params)
        else:
            enc = get_codec(choice.codec).encode(tensor, **choice.params)
        stats = TensorStats(
            original_bytes=tensor.numel() * tensor.element_size(),
            encoded_bytes=enc.nbytes,
            rel_mse=err["rel_mse"],
            max_abs_err=err["max_abs_err"],
        )
        return enc, stats
