"""sli: a layer-streaming inference runtime for large language models.

``sli`` is the user-facing layer: the processor facade (:mod:`sli.processor`), the documented
quantization API (:mod:`sli.quantization`, :mod:`sli.layer_cache`), the offline path that
quantizes models into the cache (:mod:`sli.offline`), and the CLI. It builds on ``runtime``
and ``cache``, and nothing imports it back.

Names are imported on first use (PEP 562), so importing one part of ``sli`` never loads the
others and no module inside ``sli`` depends on this file.
"""

from __future__ import annotations

import importlib

from sli.version import __version__

_EXPORTS = {
    "UniversalSLIProcessor": "sli.processor",
    "GenerationResult": "sli.processor",
    "AdaptiveQuantizer": "sli.quantization",
    "BITSANDBYTES_AVAILABLE": "sli.quantization",
    "LayerQuantizer": "sli.quantization",
    "QuantizationConfig": "sli.quantization",
    "QuantizationMode": "sli.quantization",
    "QuantizationRegistry": "sli.quantization",
    "QuantizedLinear": "sli.quantization",
    "dequantize_layer": "sli.quantization",
    "get_fp4_config": "sli.quantization",
    "get_int8_config": "sli.quantization",
    "get_mixed_precision_config": "sli.quantization",
    "get_nf4_config": "sli.quantization",
    "quantize_layer": "sli.quantization",
    "LayerCache": "sli.layer_cache",
    "ModelSourceError": "sli.offline.sources",
    "open_source": "sli.offline.sources",
    "MemoryValidationError": "sli.offline.writer",
    "QuantizationReport": "sli.offline.writer",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
