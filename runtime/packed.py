"""Packed int4 linears: which layer weights run on the packed kernel, the module that runs
them, and their weights as typed views into the derived copy (see :mod:`runtime.kernels`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cache.codecs import CodecName
from cache.manifest import Manifest, TensorEntry, layer_index
from runtime.kernels import Int4CpuKernel, PackedInt4, packed_from_record


class PackedInt4Linear(nn.Module):
    """A linear layer computing on 4-bit weights with torch's CPU kernel (bf16 activations):
    nothing is dequantized. Its weight is a :class:`PackedInt4` in the kernel's own layout,
    derived from the portable record for this host (see :mod:`runtime.kernels`)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias  # a parameter (meta until loaded) or None
        self.weight_packed: PackedInt4 | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_packed is None:
            raise RuntimeError("packed int4 linear ran without its weights loaded")
        y = Int4CpuKernel.matmul(x, self.weight_packed)
        return y + self.bias if self.bias is not None else y


def packed_tensors(manifest: Manifest) -> dict[str, int]:
    """Layer weights the CPU int4 kernel can take: name -> group size."""
    out = {}
    for g in manifest.groups:
        if layer_index(g.name) is None:
            continue
        for t in g.tensors:
            if t.codec == CodecName.INT4_GROUP.value and t.name.endswith(".weight") and Int4CpuKernel.eligible(t.shape, t.params):
                out[t.name] = int(t.params["group_size"])
    return out


def swap_packed_modules(model: nn.Module, packed: dict[str, int]) -> dict[str, int]:
    """Put a :class:`PackedInt4Linear` in place of each plain linear named in ``packed``;
    returns the names swapped (weights of other module types stay dequantized)."""
    swapped = {}
    for name, gs in packed.items():
        parent_name, _, attr = name.removesuffix(".weight").rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if isinstance(linear, nn.Linear):
            setattr(parent, attr, PackedInt4Linear(linear))
            swapped[name] = gs
    return swapped


def packed_bytes(t: TensorEntry, group_size: int) -> int:
    """Bytes a packed weight holds: the codes and the bf16 (scale, zero) pairs."""
    pk, sz = Int4CpuKernel.shapes(t.shape, group_size)
    return math.prod(pk) + 2 * math.prod(sz)


def packed_view(enc, t: TensorEntry, group_size: int) -> PackedInt4:
    """A derived record's packed weight as views into the map, in the kernel's shapes."""
    src = packed_from_record(enc)
    pk, sz = Int4CpuKernel.shapes(t.shape, group_size)
    return PackedInt4(src.packed.view(pk), src.scales_and_zeros.view(sz), src.group_size)
