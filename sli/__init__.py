"""sli: a layer-streaming inference runtime for large language models.

``sli`` is the user-facing layer (processor facade, quantization config, CLI); it builds on
``runtime`` and ``cache`` and nothing imports it back.
"""

__version__ = "0.1.0"

from sli.config import (  # noqa: E402
    AdaptiveQuantizer,
    QuantizationConfig,
    QuantizationMode,
    QuantizationRegistry,
    default_registry,
    get_fp4_config,
    get_int8_config,
    get_mixed_precision_config,
    get_nf4_config,
)
from sli.processor import UniversalSLIProcessor  # noqa: E402
from sli.quantizer import LayerQuantizer, dequantize_layer, quantize_layer  # noqa: E402
from sli.sources import ModelSourceError, open_source  # noqa: E402
from sli.writer import MemoryValidationError, QuantizationReport  # noqa: E402

__all__ = [
    "AdaptiveQuantizer",
    "LayerQuantizer",
    "MemoryValidationError",
    "ModelSourceError",
    "QuantizationConfig",
    "QuantizationMode",
    "QuantizationRegistry",
    "QuantizationReport",
    "UniversalSLIProcessor",
    "__version__",
    "default_registry",
    "dequantize_layer",
    "get_fp4_config",
    "get_int8_config",
    "get_mixed_precision_config",
    "get_nf4_config",
    "open_source",
    "quantize_layer",
]
