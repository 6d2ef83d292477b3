"""Layer 1: GPTQ against a plain reference written here (STYLE rule 19), and against
round-to-nearest on the same grid."""

import pytest
import torch

from cache.codecs import CodecName, decode_tensor, get_codec
from cache.grid import group_grid, quantize_codes
from sli.offline.gptq import GPTQError, gptq_quantize, output_error


def reference_gptq(w, h, *, bits, group_size, damp=0.01, symmetric=False, grid=None):
    """GPTQ as the paper states it, one column at a time, no blocks, no tricks: round column
    j on its group's grid (fitted on the weights as updated so far when the group starts;
    ``grid(weights, bits, symmetric, columns)`` fits it, the min/max grid by default), then
    spread its error over the columns right of it with row j of the upper Cholesky factor of
    the dampened inverse Hessian."""
    w = w.clone().double()
    h = h.double() + damp * torch.diag(h.double()).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    out = torch.empty_like(w)
    for j in range(w.shape[1]):
        if j % group_size == 0:
            if grid is None:
                scale, offset = group_grid(w[:, j : j + group_size].float(), bits, symmetric=symmetric)
            else:
                scale, offset = grid(w[:, j : j + group_size], bits, symmetric, torch.arange(j, min(j + group_size, w.shape[1])))
            s, o = scale.double(), offset.double()
        out[:, j] = quantize_codes(w[:, j], s, o, bits) * s + o
        err = (w[:, j] - out[:, j]) / u[j, j]
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
    return out


def _problem(rows=24, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    # correlated inputs with uneven channel scales, as in a transformer
    mix = torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=g) @ mix) * torch.linspace(0.2, 3.0, cols)
    return w, x, x.T @ x / tokens


@pytest.mark.parametrize("bits,codec,gs", [(4, CodecName.INT4_GROUP, 16), (3, CodecName.INT3_GROUP, 32), (4, CodecName.INT4_GROUP, 64)])
def test_gptq_equals_the_plain_reference_on_a_tiny_case(bits, codec, gs):
    w, _, h = _problem()
    ref = reference_gptq(w, h, bits=bits, group_size=gs)
    # blocks of 32 columns: the lazy block updates must give the column-by-column result
    got = gptq_quantize(w, h, codec=codec, group_size=gs, block_size=32, dtype=torch.float64)
    assert torch.allclose(got.weight.double(), ref, atol=1e-6), float((got.weight.double() - ref).abs().max())
    # and the record decodes to exactly those weights
    assert torch.allclose(decode_tensor(got.encoded, torch.float64), got.weight.double(), atol=1e-6)


def test_gptq_lowers_output_error_against_round_to_nearest_on_the_same_grid():
    w, x, h = _problem(rows=48, cols=128, tokens=1024, seed=1)
    before = w.clone()
    for codec, gs, sym in ((CodecName.INT4_GROUP, 32, False), (CodecName.INT4_GROUP, 64, True), (CodecName.INT3_GROUP, 64, False)):
        res = gptq_quantize(w, h, codec=codec, group_size=gs, symmetric=sym)
        assert torch.equal(w, before)  # float32 in, float32 arithmetic: the caller's weight is left as it was
        rtn = decode_tensor(get_codec(codec).encode(w, group_size=gs, symmetric=sym), torch.float32)
        y = x @ w.T
        e_gptq = float((x @ res.weight.T - y).pow(2).sum() / y.pow(2).sum())
        e_rtn = float((x @ rtn.T - y).pow(2).sum() / y.pow(2).sum())
        assert e_gptq < 0.8 * e_rtn, (codec, gs, sym, e_gptq, e_rtn)
        assert res.output_error == pytest.approx(e_gptq, rel=1e-3)
        assert res.rtn_output_error == pytest.approx(e_rtn, rel=1e-3)
        # the result is on the codec's grid: every decoded group is q * scale + offset of its stored numbers
        assert res.encoded.params["group_size"] == gs and res.encoded.params["symmetric"] == sym


def test_gptq_act_order_keeps_static_groups_and_helps():
    w, x, h = _problem(rows=48, cols=128, tokens=1024, seed=2)
    plain = gptq_quantize(w, h, codec=CodecName.INT4_GROUP, group_size=32)
    ordered = gptq_quantize(w, h, codec=CodecName.INT4_GROUP, group_size=32, act_order=True)
    assert ordered.encoded.parts["scale"].shape == (48, 4)  # still one grid per contiguous group of 32
    assert torch.equal(decode_tensor(ordered.encoded, torch.float32), ordered.weight)
    assert ordered.output_error < plain.rtn_output_error


def test_gptq_int8_per_channel_and_permuted_groups():
    w, _, h = _problem(rows=16, cols=64, seed=3)
    r8 = gptq_quantize(w, h, codec=CodecName.INT8_CHANNEL)
    assert r8.encoded.codec == "int8_channel" and torch.allclose(decode_tensor(r8.encoded, torch.float32), r8.weight)
    assert r8.output_error < r8.rtn_output_error
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    rp = gptq_quantize(w, h, codec=CodecName.INT4_GROUP, group_size=16, perm=perm)
    assert torch.equal(rp.encoded.parts["perm"], perm.to(torch.int32)) and rp.encoded.params["permuted"]
    assert torch.allclose(decode_tensor(rp.encoded, torch.float32), rp.weight)  # decoded in the original order
    assert output_error(w, rp.weight, h) == pytest.approx(rp.output_error, rel=1e-4)


def test_gptq_refuses_what_it_cannot_do():
    w, _, h = _problem(rows=8, cols=32)
    with pytest.raises(GPTQError, match="nf4 has none"):
        gptq_quantize(w, h, codec=CodecName.NF4)
    with pytest.raises(GPTQError, match="does not fit"):
        gptq_quantize(w, h[:16, :16], codec=CodecName.INT4_GROUP, group_size=16)
    with pytest.raises(ValueError, match="multiple of 8"):
        gptq_quantize(w, h, codec=CodecName.INT3_GROUP, group_size=12)
