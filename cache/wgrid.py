"""Importance-weighted grids for the group codecs: each group's scale and offset chosen by
the error weighted with the importance of each input channel, ``sum_j a_j (q_j s + o - w_j)^2``,
where ``a_j`` is the mean square of input channel ``j`` over calibration text (the diagonal
of the Hessian GPTQ collects; llama.cpp's importance matrix is the same statistic).

For a linear ``y = W x``, the output error of a weight error ``dW`` is
``E[(dW x)^2] = dW H dW^T``; keeping only ``diag(H)`` gives the weighted error above, so a
group whose channels see large activations is fitted where it matters.

The search (after llama.cpp's ``make_qkx2_quants``, written anew for sli's grid):

1. The plain grid of :func:`cache.grid.group_grid` is the first candidate, so the result is
   never worse than it on the weighted error.
2. ``steps`` candidate scales around it (the range over ``levels + d``, ``d`` in
   ``[-spread, spread]``): each gives codes by rounding to nearest; on those codes, scale and
   offset are refitted by weighted least squares (a 2x2 solve per group). The asymmetric grid
   then puts its offset back on an integer zero point (``offset = -zp * scale``, zero a code:
   see :mod:`cache.grid`) and refits the scale alone; the symmetric one keeps its fixed zero
   point and refits the scale alone.
3. Every candidate is scored as it will be stored: scale and offset rounded to ``scale_dtype``,
   codes re-rounded on that grid; the lowest weighted error wins, group by group.

The record format does not change: the result is one ``scale`` and one ``offset`` per group,
``w = q * scale + offset``, read by every decoder and kernel as before.
"""

from __future__ import annotations

import torch

from cache.grid import group_grid, quantize_codes

STEPS = 16  # candidate scales besides the plain grid
SPREAD = 1.0  # candidates span levels - SPREAD .. levels + SPREAD steps over the range
CHUNK_ELEMS = 1 << 22  # groups are searched in chunks of about this many weights (bounded memory)


def group_importance(importance: torch.Tensor, cols: int, group_size: int, *, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Per-column importance ``[cols]`` laid out as the codec's groups ``[ngroups, group_size]``:
    columns permuted as stored, padding columns weighted zero. Non-finite or negative entries
    are errors; all-zero importance is replaced by ones (nothing measured: plain weighting)."""
    imp = importance.detach().float().reshape(-1)
    if imp.numel() != cols:
        raise ValueError(f"importance has {imp.numel()} entries for a weight with {cols} input columns; "
                         "give one mean square per input channel (the diagonal of the layer's input second moment)")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError("importance must be finite and non-negative (mean squares of the input channels)")
    if perm is not None:
        imp = imp[perm.long()]
    ngroups = -(-cols // group_size)
    pad = ngroups * group_size - cols
    if pad:
        imp = torch.cat([imp, imp.new_zeros(pad)])
    imp = imp.reshape(ngroups, group_size)
    # a group with no measured energy at all is weighted uniformly, so it still gets a sane grid
    dead = imp.sum(dim=1, keepdim=True) <= 0
    return torch.where(dead, torch.ones_like(imp), imp)


def _stored(scale: torch.Tensor, offset: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return scale.clamp_min(1e-8).to(scale_dtype), offset.to(scale_dtype)


def _score(g, a, scale, offset, bits) -> torch.Tensor:
    """Weighted error of each group on the stored grid ``scale``/``offset`` ``[...]``."""
    sf, of = scale.float()[..., None], offset.float()[..., None]
    q = quantize_codes(g, sf, of, bits)
    return (a * (q * sf + of - g).square()).sum(dim=-1)


def _search(g: torch.Tensor, a: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype, steps: int, spread: float):
    levels = (1 << bits) - 1
    best_s, best_o = group_grid(g, bits, symmetric=symmetric, scale_dtype=scale_dtype)
    best_e = _score(g, a, best_s, best_o, bits)
    half = (levels + 1) // 2
    if symmetric:
        base = g.abs().amax(dim=-1)  # [...]
        span = levels / 2
    else:
        lo, hi = torch.aminmax(g, dim=-1)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        base = hi - lo
        span = levels
    sa = a.sum(dim=-1)
    for k in range(steps):
        d = -spread + 2 * spread * k / max(steps - 1, 1)
        s0 = (base / (span + d)).clamp_min(1e-8)[..., None]
        if symmetric:
            o0 = -half * s0
        else:
            o0 = -torch.round(-lo[..., None] / s0).clamp(0, levels) * s0
        q = torch.round((g - o0) / s0).clamp_(0, levels)  # codes on the candidate
        if symmetric:
            c = q - half  # fixed zero point: fit the scale alone
            den = (a * c * c).sum(dim=-1)
            s = torch.where(den > 0, (a * c * g).sum(dim=-1) / den.clamp_min(1e-30), s0[..., 0])
            o = -half * s
        else:
            # weighted least squares for (s, o) on these codes: [sum a q^2, sum a q; sum a q, sum a] [s; o] = [sum a q g; sum a g]
            aq = a * q
            sqq, sq, sqg, sg = (aq * q).sum(-1), aq.sum(-1), (aq * g).sum(-1), (a * g).sum(-1)
            det = sqq * sa - sq * sq
            ok = det > 1e-12 * sqq.clamp_min(1e-30) * sa.clamp_min(1e-30)
            s = torch.where(ok, (sa * sqg - sq * sg) / torch.where(ok, det, torch.ones_like(det)), s0[..., 0]).clamp_min(1e-8)
            o = torch.where(ok, (sg - s * sq) / sa.clamp_min(1e-30), o0[..., 0])
            zp = torch.round(-o / s).clamp_(0, levels)  # back onto an integer zero point
            c = q - zp[..., None]
            den = (a * c * c).sum(dim=-1)
            s = torch.where(den > 0, (a * c * g).sum(dim=-1) / den.clamp_min(1e-30), s).clamp_min(1e-8)
            o = -zp * s
        cs, co = _stored(s, o, scale_dtype)
        if not symmetric:  # the stored offset from the stored scale, as affine_grid does
            co = (-zp * cs.float()).to(scale_dtype)
        e = _score(g, a, cs, co, bits)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, cs, best_s)
        best_o = torch.where(better, co, best_o)
    return best_s, best_o


def weighted_group_grid(
    g: torch.Tensor,
    weights: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    steps: int = STEPS,
    spread: float = SPREAD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of each group chosen by the weighted error (see the module docstring).

    Args:
        g: ``[rows, ngroups, group_size]`` float32 weights.
        weights: the importance of each weight, broadcastable to ``g`` (``[ngroups, group_size]``
            from :func:`group_importance`).
        bits: code width.
        symmetric: the symmetric grid; else asymmetric with an integer zero point.

    Returns:
        ``scale``, ``offset``: ``g.shape[:-1]``, in ``scale_dtype``; never a larger weighted
        error than :func:`cache.grid.group_grid`'s.
    """
    if g.dim() != 3:
        raise ValueError(f"weighted_group_grid takes [rows, groups, group_size] weights, got shape {tuple(g.shape)}")
    g = g.float()
    a = weights.float().expand_as(g)
    rows = g.shape[0]
    step = max(1, CHUNK_ELEMS // max(1, g[0].numel()))
    scale = torch.empty(g.shape[:-1], dtype=scale_dtype)
    offset = torch.empty(g.shape[:-1], dtype=scale_dtype)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        scale[r0:r1], offset[r0:r1] = _search(g[r0:r1], a[r0:r1], bits, symmetric, scale_dtype, steps, spread)
    return scale, offset
