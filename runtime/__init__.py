"""sli's runtime: architecture registry, memory accounting (streaming executor to come).

Imports ``cache``; never ``sli``.
"""

from runtime.arch import ArchSpec, UnsupportedArchitectureError, get_arch, known_architectures, register_architecture
from runtime.memory import PeakMemorySampler, anon_rss_bytes, format_size, parse_size

__all__ = [
    "ArchSpec",
    "PeakMemorySampler",
    "UnsupportedArchitectureError",
    "anon_rss_bytes",
    "format_size",
    "get_arch",
    "known_architectures",
    "parse_size",
    "register_architecture",
]
