"""The processor under the module name the quantization document imports it from
(``...sli.universal_sli``); the implementation is :mod:`sli.processor`."""

from sli.processor import UniversalSLIProcessor

__all__ = ["UniversalSLIProcessor"]
