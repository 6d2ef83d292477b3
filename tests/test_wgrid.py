"""Layer 1: importance-weighted grids (cache.wgrid) against a plain reference written here
(STYLE rule 19); the records they give are the codec's format, decoded unchanged; GPTQ on
weighted grids against the plain GPTQ reference of tests/test_gptq.py."""

import pytest
import torch

from cache.codecs import CodecName, decode_tensor, get_codec
from cache.grid import group_grid, quantize_codes
from cache.wgrid import SPREAD, STEPS, group_importance, weighted_group_grid
from sli.offline.gptq import gptq_quantize

from test_gptq import _problem, reference_gptq


def reference_weighted_grid(w, a, bits, *, symmetric=False, steps=STEPS, spread=SPREAD):
    """One group at a time, in plain Python over float64: try the min/max grid and ``steps``
    scales around it; on each one's codes, refit scale and offset by weighted least squares
    (scale alone on a fixed zero point: the symmetric one, or the asymmetric one's integer zero
    point rounded from the fit); keep the lowest weighted error of the stored (fp16) grid."""
    levels = 2**bits - 1
    half = (levels + 1) // 2
    scale = torch.empty(w.shape[:2], dtype=torch.float16)
    offset = torch.empty(w.shape[:2], dtype=torch.float16)

    def err(x, wt, s, o):
        s, o = s.to(torch.float16).double(), o.to(torch.float16).double()
        q = torch.clamp(torch.round((x - o) / s), 0, levels)
        return float((wt * (q * s + o - x) ** 2).sum())

    for r in range(w.shape[0]):
        for g in range(w.shape[1]):
            x, wt = w[r, g].double(), a[g].double()
            s, o = group_grid(w[r, g][None].float(), bits, symmetric=symmetric)
            best = (err(x, wt, s.double()[0], o.double()[0]), s[0], o[0])
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            for k in range(steps):
                d = -spread + 2 * spread * k / (steps - 1)
                if symmetric:
                    s0 = max(float(x.abs().max()) / (levels / 2 + d), 1e-8)
                    q = torch.clamp(torch.round(x / s0 + half), 0, levels)
                    c = q - half
                    s1 = float((wt * c * x).sum() / (wt * c * c).sum())
                    o1 = -half * s1
                    cs = torch.tensor(max(s1, 1e-8)).to(torch.float16)
                    co = torch.tensor(o1).to(torch.float16)
                else:
                    s0 = max((hi - lo) / (levels + d), 1e-8)
                    z0 = min(max(round(-lo / s0), 0), levels)
                    q = torch.clamp(torch.round(x / s0 + z0), 0, levels)
                    m = torch.stack([q, torch.ones_like(q)], 1) * wt.sqrt()[:, None]  # weighted least squares
                    s1, o1 = torch.linalg.lstsq(m, x * wt.sqrt()).solution.tolist()
                    s1 = max(s1, 1e-8)
                    zp = min(max(round(-o1 / s1), 0), levels)
                    c = q - zp
                    s2 = max(float((wt * c * x).sum() / (wt * c * c).sum()), 1e-8)
                    cs = torch.tensor(s2).to(torch.float16)
                    co = torch.tensor(-zp * float(cs)).to(torch.float16)
                e = err(x, wt, cs.double(), co.double())
                if e < best[0]:
                    best = (e, cs, co)
            scale[r, g], offset[r, g] = best[1], best[2]
    return scale, offset


def _weighted_errors(w, a, scale, offset, bits):
    sf, of = scale.double()[..., None], offset.double()[..., None]
    q = quantize_codes(w.double(), sf, of, bits)
    return (a.double() * (q * sf + of - w.double()) ** 2).sum(-1)


def _case(rows=6, groups=4, gs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups, gs, generator=g) * 0.05
    w[0, 0, 3] = 0.4  # an outlier: the min/max grid wastes its range on it
    a = torch.rand(groups, gs, generator=g) ** 4 * 10  # uneven channel energies
    return w, a


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (3, False), (2, False)])
def test_weighted_grid_equals_the_plain_reference_on_a_tiny_case(bits, symmetric):
    w, a = _case(seed=bits)
    s, o = weighted_group_grid(w, a, bits, symmetric=symmetric)
    rs, ro = reference_weighted_grid(w, a, bits, symmetric=symmetric)
    got, ref = _weighted_errors(w, a, s, o, bits), _weighted_errors(w, a, rs, ro, bits)
    # the same search: the same weighted error group by group (float32 against float64 arithmetic)
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-9), (got - ref).abs().max()
    plain = _weighted_errors(w, a, *group_grid(w, bits, symmetric=symmetric), bits)
    assert bool((got <= plain * (1 + 1e-6)).all())  # never worse than the min/max grid
    assert float(got.sum()) < 0.9 * float(plain.sum())  # and better where importance is uneven


def test_importance_lowers_the_output_error_and_keeps_the_record_format():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    x = torch.randn(2048, 256) * torch.linspace(0.05, 3.0, 256) ** 2  # channel energies spread widely
    imp = x.square().mean(0)
    codec = get_codec(CodecName.INT4_GROUP)
    plain = codec.encode(w, group_size=64)
    weighted = codec.encode(w, group_size=64, importance=imp)
    # the same record: the same parts, shapes, dtypes and parameters; the decoder reads it unchanged
    assert weighted.params == plain.params
    assert {k: (v.shape, v.dtype) for k, v in weighted.parts.items()} == {k: (v.shape, v.dtype) for k, v in plain.parts.items()}
    y = x @ w.T

    def out_err(enc):
        return float((x @ decode_tensor(enc, torch.float32).T - y).pow(2).sum() / y.pow(2).sum())

    assert out_err(weighted) < 0.95 * out_err(plain)
    # fake_quantize and encode_measured give the same numbers as encode + decode
    assert torch.equal(codec.fake_quantize(w, group_size=64, importance=imp), decode_tensor(weighted, torch.float32))
    enc, _ = codec.encode_measured(w, group_size=64, importance=imp)
    assert torch.equal(enc.parts["scale"], weighted.parts["scale"]) and torch.equal(enc.parts["packed"], weighted.parts["packed"])


def test_importance_follows_a_permutation_and_padding():
    torch.manual_seed(1)
    w = torch.randn(8, 40) * 0.05  # 40 columns in groups of 16: the last group padded
    imp = torch.rand(40) + 0.1
    perm = torch.randperm(40)
    codec = get_codec(CodecName.INT3_GROUP)
    enc = codec.encode(w, group_size=16, importance=imp, perm=perm)
    assert decode_tensor(enc, torch.float32).shape == (8, 40)
    a = group_importance(imp, 40, 16, perm=perm)
    assert a.shape == (3, 16) and torch.equal(a[0], imp[perm[:16]]) and float(a[2, 8:].abs().sum()) == 0.0


def test_bad_importance_is_refused():
    w = torch.randn(4, 32)
    codec = get_codec(CodecName.INT4_GROUP)
    with pytest.raises(ValueError, match="importance has 31 entries for a weight with 32 input columns"):
        codec.encode(w, group_size=16, importance=torch.ones(31))
    with pytest.raises(ValueError, match="finite and non-negative"):
        codec.encode(w, group_size=16, importance=-torch.ones(32))
    with pytest.raises(ValueError, match=r"\[rows, groups, group_size\]"):
        weighted_group_grid(w, torch.ones(32), 4)


def _weighted_fit(h):
    d = torch.diag(h)

    def fit(wg, bits, symmetric, cols):
        s, o = weighted_group_grid(wg.float()[:, None, :], d[cols].float()[None, None, :], bits, symmetric=symmetric)
        return s[:, 0], o[:, 0]

    return fit


@pytest.mark.parametrize("bits,codec,gs", [(4, CodecName.INT4_GROUP, 16), (3, CodecName.INT3_GROUP, 32)])
def test_gptq_on_weighted_grids_equals_the_plain_reference(bits, codec, gs):
    w, x, h = _problem()
    ref = reference_gptq(w, h, bits=bits, group_size=gs, grid=_weighted_fit(h))
    got = gptq_quantize(w, h, codec=codec, group_size=gs, block_size=32, dtype=torch.float64, weighted_grid=True)
    assert torch.allclose(got.weight.double(), ref, atol=1e-6), float((got.weight.double() - ref).abs().max())
    plain = gptq_quantize(w, h, codec=codec, group_size=gs, block_size=32, dtype=torch.float64)
    assert got.output_error < plain.output_error  # on these uneven inputs the weighted grids help GPTQ too


def test_gptq_static_groups_take_weighted_grids_from_the_original_weights():
    w, _, h = _problem(rows=32, cols=64, seed=4)
    res = gptq_quantize(w, h, codec=CodecName.INT4_GROUP, group_size=16, act_order=True, weighted_grid=True)
    fit = _weighted_fit(h)
    for g in range(4):
        cols = torch.arange(g * 16, (g + 1) * 16)
        s, o = fit(w[:, cols], 4, False, cols)
        assert torch.equal(res.encoded.parts["scale"][:, g], s) and torch.equal(res.encoded.parts["offset"][:, g], o)
