"""Packed int4 linears: the modules that run the derived copy's weights on torch's CPU int4
kernel (see :mod:`runtime.kernels`, :mod:`runtime.derived`), swapped into transformers' own
model in place of its ``nn.Linear`` modules.

- :class:`PackedInt4Linear`: one weight, one kernel call.
- :class:`StackedProjection` with its :class:`StackedMember` modules: projections that read
  the same input (``q_proj``, ``k_proj``, ``v_proj``) run as one kernel call on their stacked
  weight; each member module returns its rows of that output. The first member called with
  an input computes for all; the others take their slice of the same result. transformers'
  own attention and MLP code call the members as before, so nothing else changes.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.derived import DerivedTensor
from runtime.kernels import PackedInt4
from runtime.rows import RowsKernel


class PackedInt4Linear(nn.Module):
    """A linear layer computing on 4-bit weights with torch's CPU kernel (bf16 activations):
    nothing is dequantized. Its weight is a :class:`PackedInt4` in the kernel's own layout,
    derived from the portable record for this host. ``kernel`` picks how it multiplies by the
    rows of the step (:class:`runtime.rows.RowsKernel`)."""

    def __init__(self, linear: nn.Linear, kernel: RowsKernel) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias  # a parameter (meta until loaded) or None
        self.weight_packed: PackedInt4 | None = None
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_packed is None:
            raise RuntimeError("packed int4 linear ran without its weights loaded")
        y = self.kernel.matmul(x, self.weight_packed)
        return y + self.bias if self.bias is not None else y


class StackedProjection:
    """The stacked weight of several projections of one input, and the last result.

    Invariant: ``_left`` members have yet to take their rows of ``_y``, computed for ``_x``."""

    def __init__(self, rows: tuple[int, ...], kernel: RowsKernel) -> None:
        self.kernel = kernel
        self.bounds = [(sum(rows[:k]), sum(rows[: k + 1])) for k in range(len(rows))]
        self.weight_packed: PackedInt4 | None = None
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._left = 0

    def rows_of(self, k: int, x: torch.Tensor) -> torch.Tensor:
        if self._x is not x or self._left == 0:
            if self.weight_packed is None:
                raise RuntimeError("stacked int4 projection ran without its weights loaded")
            self._y = self.kernel.matmul(x, self.weight_packed)  # [..., sum of rows]
            self._x, self._left = x, len(self.bounds)
        y = self._y
        self._left -= 1
        if self._left == 0:  # every member has its rows: drop the references
            self._x = self._y = None
        lo, hi = self.bounds[k]
        return y[..., lo:hi]

    def clear(self) -> None:
        self.weight_packed = self._x = self._y = None
        self._left = 0


class StackedMember(nn.Module):
    """One projection of a :class:`StackedProjection` (its rows, plus its own bias)."""

    def __init__(self, linear: nn.Linear, stack: StackedProjection, index: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.stack, self.index = stack, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stack.rows_of(self.index, x)
        return y + self.bias if self.bias is not None else y


def swap_packed_modules(model: nn.Module, layout: dict[str, list[DerivedTensor]], kernel: RowsKernel | None = None,
                        ) -> dict[str, PackedInt4Linear | StackedProjection]:
    """Put packed modules in place of the plain linears the derived copy serves; returns the
    derived name -> the object whose ``weight_packed`` the loader sets. ``kernel``: the one
    kernel choice every packed module shares (default: the packed kernel for every row count).

    Raises:
        TypeError: a module the layout names is not an ``nn.Linear`` (the manifest and the
            model's code disagree).
    """
    kernel = kernel if kernel is not None else RowsKernel()
    targets: dict[str, PackedInt4Linear | StackedProjection] = {}
    for items in layout.values():
        for d in items:
            linears = []
            for path in d.modules:
                parent_name, _, attr = path.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                linear = getattr(parent, attr)
                if not isinstance(linear, nn.Linear):
                    raise TypeError(f"{path} is a {type(linear).__name__}, not the nn.Linear its int4 weight was packed for")
                linears.append((parent, attr, linear))
            if not d.fused:
                parent, attr, linear = linears[0]
                setattr(parent, attr, PackedInt4Linear(linear, kernel))
                targets[d.name] = getattr(parent, attr)
                continue
            stack = StackedProjection(d.rows, kernel)
            for k, (parent, attr, linear) in enumerate(linears):
                setattr(parent, attr, StackedMember(linear, stack, k))
            targets[d.name] = stack
    return targets
