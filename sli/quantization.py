"""The documented quantization API (``QuantizationConfig``, ``LayerQuantizer``,
``AdaptiveQuantizer``, the presets, the class-level ``QuantizationRegistry``,
``quantize_layer`` / ``dequantize_layer``, ``BITSANDBYTES_AVAILABLE``): the names of the
quantization module sli was specified from, importable here and from ``sli``.

It is a surface, not an implementation: plans live in :mod:`sli.offline.config`, the
per-tensor quantizer in :mod:`sli.offline.quantizer`, quantized modules in
:mod:`sli.offline.modules`; they encode with :mod:`cache.codecs` and compute with
:mod:`runtime.kernels`, exactly as the streaming cache and runtime do. :mod:`sli.layer_cache`
keeps quantized layers in the streaming cache's store.

Sizes: :meth:`LayerQuantizer.get_quantized_size_ratio` compares the quantized bytes with the
same layer in its compute dtype (float16 unless set: the document's 16-bit baseline), so NF4
gives about 0.25 and INT8 about 0.5. The compute dtype rule is in :mod:`sli.offline.config`.
"""

from sli.offline.adaptive import AdaptiveQuantizer
from sli.offline.config import QuantizationConfig, QuantizationMode
from sli.offline.plans import (
    QuantizationRegistry,
    get_fp4_config,
    get_int8_config,
    get_mixed_precision_config,
    get_nf4_config,
)
from sli.offline.modules import LayerQuantizer, QuantizedLinear, dequantize_layer, quantize_layer
from sli.offline.quantizer import BITSANDBYTES_AVAILABLE

__all__ = [
    "BITSANDBYTES_AVAILABLE",
    "AdaptiveQuantizer",
    "LayerQuantizer",
    "QuantizationConfig",
    "QuantizationMode",
    "QuantizationRegistry",
    "QuantizedLinear",
    "dequantize_layer",
    "get_fp4_config",
    "get_int8_config",
    "get_mixed_precision_config",
    "get_nf4_config",
    "quantize_layer",
]
