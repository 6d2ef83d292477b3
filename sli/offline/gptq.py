"""GPTQ (Frantar et al., 2022): round a weight column by column and push each column's
rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the
layer's calibration inputs, so the *output* error on those inputs is what is minimised.

The grid is the one the stored codec decodes (:mod:`cache.grid` for int4/int3/int2 groups,
symmetric per-row int8 for ``int8_channel``), with *static* groups: every stored group keeps
one scale and one offset, so a GPTQ record is read by the same decoder and kernels as a
round-to-nearest one.

- Blocked lazy updates: columns are processed in blocks of ``block_size``; inside a block the
  error is propagated column by column, to the rest of the weight once per block (one matmul).
- Dampening: ``damp`` times the mean of the Hessian's diagonal is added to its diagonal.
- The inverse Hessian is taken through Cholesky factors (``H = L L^T``; the upper Cholesky
  factor of ``H^-1`` gives each column's update row).
- A group's scale and offset are fitted when its first column comes up, on the weights as
  updated so far (blocks are aligned to groups for this). With ``act_order`` the columns are
  processed by decreasing Hessian diagonal, and the groups' grids are fitted on the original
  weights first (static groups), since a group's columns then come up scattered.
- ``weighted_grid``: each group's grid is chosen by the error weighted with its input
  channels' mean squares (the Hessian's diagonal; :mod:`cache.wgrid`) instead of the plain
  min/max grid.

The plain reference this is checked against lives in ``tests/test_gptq.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cache.codecs import CodecName, get_codec
from cache.grid import group_grid, inverse_permutation, quantize_codes
from cache.wgrid import weighted_group_grid
from cache.record import EncodedTensor

GPTQ_CODECS = (CodecName.INT4_GROUP, CodecName.INT3_GROUP, CodecName.INT2_GROUP, CodecName.INT8_CHANNEL)
_BITS = {CodecName.INT4_GROUP: 4, CodecName.INT3_GROUP: 3, CodecName.INT2_GROUP: 2}


@contextmanager
def single_thread() -> Iterator[None]:
    """torch on one thread for the column loop: its steps are small, and with two OpenMP
    threads each one waits at a barrier for the other; on a busy 2-core host that made GPTQ
    10x slower (measured: a 576x1536 weight took 47 s on two threads, 4.7 s on one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class GPTQError(ValueError):
    """GPTQ cannot quantize this weight as asked."""


@dataclass(frozen=True)
class GPTQResult:
    encoded: EncodedTensor
    weight: torch.Tensor  # the dequantized weight [rows, cols], float32, original column order
    output_error: float  # tr(dW H dW^T) / tr(W H W^T): relative output error on the calibration inputs
    rtn_output_error: float  # the same for round-to-nearest on the same grid (weighted too when the grids are)


def output_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    """Relative output error of ``approx`` for inputs whose second moment is ``h`` ([cols, cols])."""
    d = (approx - w).to(h.dtype)
    num = float(((d @ h) * d).sum())
    den = float(((w.to(h.dtype) @ h) * w.to(h.dtype)).sum())
    return num / den if den > 0 else 0.0


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``. At most two matrices of
    H's size are alive at once (an 8192-wide Hessian is 268 MB in float32)."""
    h = h.clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0  # channels that never fired: nothing to compensate
    h.diagonal().add_(damp * float(torch.diag(h).mean()))
    lower = torch.linalg.cholesky(h)
    del h
    hinv = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(hinv, upper=True)


def _fit_grid(wg: torch.Tensor, d: torch.Tensor | None, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of one group ``wg`` ``[rows, group_size]``: plain, or weighted by ``d`` ``[group_size]``."""
    if d is None:
        return group_grid(wg.float(), bits, symmetric=symmetric)
    a = d.float().clamp_min(0)
    if float(a.sum()) <= 0:
        a = torch.ones_like(a)
    s, o = weighted_group_grid(wg.float()[:, None, :], a[None, None, :], bits, symmetric=symmetric)
    return s[:, 0], o[:, 0]


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    *,
    codec: CodecName | str,
    group_size: int | None = None,
    symmetric: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    perm: torch.Tensor | None = None,
    weighted_grid: bool = False,
    dtype: torch.dtype = torch.float32,
) -> GPTQResult:
    """Quantize ``w`` ``[rows, cols]`` with GPTQ on the grid of ``codec``.

    Args:
        h: the second moment of the layer's inputs, ``mean(x x^T)`` ``[cols, cols]``.
        codec: ``int4_group``, ``int3_group``, ``int2_group`` (with ``group_size``) or ``int8_channel``.
        perm: store the columns in this order (channel permutation; see :mod:`cache.codecs`).
        weighted_grid: groups' grids chosen by the error weighted with ``diag(h)`` (:mod:`cache.wgrid`).
        dtype: the arithmetic (float32; the tests use float64).

    Raises:
        GPTQError: a codec GPTQ has no grid for, or a Hessian that is not positive definite
            even after dampening.
    """
    codec = CodecName(codec)
    if codec not in GPTQ_CODECS:
        raise GPTQError(f"GPTQ rounds onto integer grids ({[c.value for c in GPTQ_CODECS]}); {codec.value} has none: "
                        "use int4/int3/int2 or int8_dynamic, or drop --calibrate gptq for this mode")
    rows, cols = w.shape
    if tuple(h.shape) != (cols, cols):
        raise GPTQError(f"Hessian {tuple(h.shape)} does not fit a weight with {cols} input channels")
    W0 = w.to(dtype)
    H0 = h.to(dtype)
    if perm is not None:
        W0, H0 = W0[:, perm.long()], H0[perm.long()][:, perm.long()]
    order = torch.argsort(torch.diag(H0), descending=True, stable=True) if act_order else None
    W = W0 if order is None else W0[:, order]
    Hp = H0 if order is None else H0[order][:, order]
    try:
        with single_thread():
            U = _inverse_hessian_factor(Hp, damp)
    except torch.linalg.LinAlgError as e:
        raise GPTQError(f"the Hessian of a {rows}x{cols} weight is not positive definite after dampening {damp}; "
                        "raise damp or give more calibration samples") from e

    grouped = codec in _BITS
    if grouped:
        bits = _BITS[codec]
        gs = int(group_size or 0)
        get_codec(codec)._check_group(gs)  # same rule as the codec's
        ngroups = -(-cols // gs)
        scale = torch.empty(rows, ngroups, dtype=torch.float16)
        offset = torch.empty(rows, ngroups, dtype=torch.float16)
        d0 = torch.diag(H0) if weighted_grid else None  # stored column order
        dp = torch.diag(Hp) if weighted_grid else None  # processing order
        if order is not None:  # static groups: every grid from the original weights
            for g in range(ngroups):
                cs = slice(g * gs, (g + 1) * gs)
                scale[:, g], offset[:, g] = _fit_grid(W0[:, cs], None if d0 is None else d0[cs], bits, symmetric)
        block = max(gs, block_size // gs * gs)  # blocks hold whole groups
        levels = (1 << bits) - 1
    else:  # int8 per output channel: one symmetric grid per row, from the original row
        bits, gs = 8, cols
        s8 = (W0.float().abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        s8d = s8.to(dtype)
        block = block_size

    # transposed: a column of W is a contiguous row of WT, so each step below touches
    # contiguous memory (the column-by-column loop is GPTQ's cost on a CPU)
    WT = W.T.contiguous()  # [cols, rows], processing order
    codes = torch.empty(cols, rows, dtype=dtype)  # stored column order (integers, converted at the end)
    QT = torch.empty_like(WT)  # dequantized, processing order
    with single_thread():
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            W1 = WT[i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            U1 = U[i1:i2, i1:i2]
            g_cur = -1
            for i in range(i2 - i1):
                col = i1 + i
                orig = col if order is None else int(order[col])
                w_i, q = W1[i], codes[orig]
                if grouped:
                    g = orig // gs
                    if order is None and orig % gs == 0:  # fit the group's grid on the weights as updated so far
                        scale[:, g], offset[:, g] = _fit_grid(W1[i : i + gs].T, None if dp is None else dp[col : col + gs], bits, symmetric)
                        g_cur = -1
                    if g != g_cur:
                        sf, of, g_cur = scale[:, g].to(dtype), offset[:, g].to(dtype), g
                    torch.round(torch.sub(w_i, of, out=q).div_(sf), out=q).clamp_(0, levels)
                    torch.addcmul(of, q, sf, out=QT[col])
                else:
                    torch.round(torch.div(w_i, s8d, out=q), out=q).clamp_(-127, 127)
                    torch.mul(q, s8d, out=QT[col])
                err = Err1[i]
                torch.sub(w_i, QT[col], out=err).div_(U1[i, i])
                if i + 1 < i2 - i1:
                    W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1)
            if i2 < cols:
                WT[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)
    Q = QT.T
    codes = codes.T.to(torch.int16)
    weight = Q if order is None else Q[:, torch.argsort(order)]  # stored (perm) order
    if grouped:
        enc = get_codec(codec).encode_codes(codes, scale, offset, w, group_size=gs, symmetric=symmetric, perm=perm)
        rtn = get_codec(codec).decode(get_codec(codec).encode(W0.float(), group_size=gs, symmetric=symmetric, importance=d0), torch.float32)
    else:
        enc = EncodedTensor(codec.value, (rows, cols), str(w.dtype).removeprefix("torch."),
                            {"q": codes.to(torch.int8).contiguous(), "scale": s8.float().contiguous()})
        rtn = torch.round(W0.float() / s8[:, None]).clamp_(-127, 127) * s8[:, None]
    err_gptq = output_error(W0.float(), weight.float(), H0.float())
    err_rtn = output_error(W0.float(), rtn, H0.float())
    if perm is not None:  # back to the original column order
        weight = weight[:, inverse_permutation(perm.to(torch.int64))]
    return GPTQResult(encoded=enc, weight=weight.float(), output_error=err_gptq, rtn_output_error=err_rtn)
