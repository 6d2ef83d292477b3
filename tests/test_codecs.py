"""Layer 1: every codec's round trip, with error bounds, on fixed seeds."""

import pytest
import torch

from cache.codecs import CodecName, decode_tensor, get_codec, tensor_error


def _weight(rows=96, cols=256, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)


# relative MSE bounds for Gaussian weights: 8-bit ~1e-4, 4-bit ~1e-2, 2-bit ~0.1-0.2
BOUNDS = {
    CodecName.RAW: 0.0,
    CodecName.INT8_OUTLIER: 2e-4,
    CodecName.INT8_CHANNEL: 2e-4,
    CodecName.NF4: 1.2e-2,
    CodecName.FP4: 2.5e-2,
    CodecName.INT4_GROUP: 1.5e-2,
    CodecName.INT3_GROUP: 6e-2,  # min-max 3-bit on Gaussian groups of 128: ~0.045
    CodecName.INT2_GROUP: 0.3,  # theory for min-max 2-bit on Gaussian groups of 128: ~0.25
}


@pytest.mark.parametrize("codec", list(CodecName))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_within_bound(codec, dtype):
    w = _weight(dtype=dtype)
    enc = get_codec(codec).encode(w)
    assert enc.codec == codec.value and enc.shape == tuple(w.shape)
    out = decode_tensor(enc)
    assert out.shape == w.shape and out.dtype == dtype
    err = tensor_error(w, out)
    assert err["rel_mse"] <= BOUNDS[codec], (codec, err)
    if codec is not CodecName.RAW:
        assert err["rel_mse"] > 0  # a lossy codec that reports no loss would be suspicious
        assert enc.nbytes < w.numel() * w.element_size()


def test_bits_per_weight_of_packed_codecs():
    w = _weight(rows=128, cols=1024, dtype=torch.float16)
    n = w.numel()
    bpw = {c: 8 * get_codec(c).encode(w).nbytes / n for c in (CodecName.NF4, CodecName.INT4_GROUP, CodecName.INT3_GROUP, CodecName.INT2_GROUP)}
    assert 4.0 < bpw[CodecName.NF4] < 4.3  # 4 bits + double-quantized absmax per 64
    assert 4.0 < bpw[CodecName.INT4_GROUP] < 4.3  # 4 bits + fp16 scale and offset per 128
    assert 3.0 < bpw[CodecName.INT3_GROUP] < 3.3  # a 2-bit and a 1-bit plane
    assert 2.0 < bpw[CodecName.INT2_GROUP] < 2.3


def test_group_codec_pads_ragged_rows_and_respects_group_size():
    w = _weight(rows=7, cols=200)  # 200 is not a multiple of 128
    for gs in (32, 64, 128):
        enc = get_codec(CodecName.INT4_GROUP).encode(w, group_size=gs)
        assert enc.parts["scale"].shape == (7, -(-200 // gs))
        out = decode_tensor(enc)
        assert out.shape == (7, 200)
    e32 = tensor_error(w, decode_tensor(get_codec(CodecName.INT4_GROUP).encode(w, group_size=32)))["rel_mse"]
    e128 = tensor_error(w, decode_tensor(get_codec(CodecName.INT4_GROUP).encode(w, group_size=128)))["rel_mse"]
    assert e32 < e128  # smaller groups fit better
    with pytest.raises(ValueError, match="multiple of 2"):
        get_codec(CodecName.INT4_GROUP).encode(w, group_size=33)


def test_group_codec_is_exact_on_its_own_grid():
    # weights already on a 4-bit grid with an integer zero point are reproduced exactly
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (4, 128), generator=g).float()
    q[:, 0], q[:, 1] = 0, 15  # each group spans the whole code range
    scale = torch.tensor([0.5, 0.25, 0.125, 1.0])[:, None]
    zp = torch.tensor([6.0, 3.0, 12.0, 8.0])[:, None]
    w = ((q - zp) * scale).to(torch.float32)
    enc = get_codec(CodecName.INT4_GROUP).encode(w, group_size=128)
    assert torch.equal(decode_tensor(enc), w)
    assert torch.equal(enc.parts["offset"].float(), -zp * scale)  # offset = -zero_point * scale


def test_group_grid_holds_zero_and_symmetric_grid():
    """The asymmetric grid has an integer zero point (zero is a code, so small weights keep their
    sign); the symmetric one spans -8..7 steps of absmax / 7.5."""
    w = _weight(rows=32, cols=128, dtype=torch.float32, seed=4)
    for bits, codec in ((4, CodecName.INT4_GROUP), (3, CodecName.INT3_GROUP), (2, CodecName.INT2_GROUP)):
        enc = get_codec(codec).encode(w, group_size=64)
        zp = -enc.parts["offset"].float() / enc.parts["scale"].float()
        # the offset is -zp * scale rounded to fp16: zero is a code up to < 1% of a step
        assert torch.allclose(zp, zp.round(), atol=0.01) and zp.min() >= 0 and zp.max() <= 2**bits - 1
        out = decode_tensor(enc, torch.float32)
        step = enc.parts["scale"].float().repeat_interleave(64, dim=1)
        tiny = w.abs() < 0.25 * step
        assert (out[tiny].abs() <= 0.01 * step[tiny]).all()  # weights within a quarter step of zero decode to (almost) zero
    sym = get_codec(CodecName.INT4_GROUP).encode(w, group_size=64, symmetric=True)
    s = sym.parts["scale"].float()
    assert torch.allclose(s, (w.view(32, 2, 64).abs().amax(-1) / 7.5).half().float())
    assert torch.equal(sym.parts["offset"].float(), (-8 * s).half().float()) and sym.params["symmetric"] is True
    assert tensor_error(w, decode_tensor(sym))["rel_mse"] < BOUNDS[CodecName.INT4_GROUP]


def test_int3_packs_three_bits_and_permuted_columns_decode_in_place():
    w = _weight(rows=16, cols=96, dtype=torch.float32, seed=6)
    c3 = get_codec(CodecName.INT3_GROUP)
    enc = c3.encode(w, group_size=32)
    assert enc.parts["packed"].shape == (16, 24) and enc.parts["packed_hi"].shape == (16, 12)  # 2 + 1 bits a weight
    q = c3.unpack(enc)
    assert q.max() <= 7 and torch.equal(q & 3, get_codec(CodecName.INT2_GROUP).unpack(
        type(enc)("int2_group", enc.shape, enc.dtype, {"packed": enc.parts["packed"]}, enc.params)))
    with pytest.raises(ValueError, match="multiple of 8"):
        c3.encode(w, group_size=12)
    # columns ordered by L2 norm before grouping: stored with the record, decoded back in place
    w[:, ::7] *= 20  # a few loud columns
    plain = get_codec(CodecName.INT4_GROUP).encode(w, group_size=32)
    perm = get_codec(CodecName.INT4_GROUP).encode(w, group_size=32, permute="weight")
    order = torch.argsort(w.norm(dim=0), descending=True, stable=True)
    assert torch.equal(perm.parts["perm"], order.to(torch.int32)) and perm.params["permuted"] is True
    back = decode_tensor(perm, torch.float32)
    assert tensor_error(w, back)["rel_mse"] < tensor_error(w, decode_tensor(plain, torch.float32))["rel_mse"]
    out = torch.empty(16, 96)
    assert torch.equal(decode_tensor(perm, out=out), back)
    with pytest.raises(ValueError, match="permutation of the 96 columns"):
        get_codec(CodecName.INT4_GROUP).encode(w, group_size=32, perm=torch.zeros(96, dtype=torch.int32))


def test_int8_outlier_columns_kept_in_16bit():
    w = _weight(rows=32, cols=64, dtype=torch.float32)
    w[:, 5] = 9.0
    w[3, 40] = -7.5
    enc = get_codec(CodecName.INT8_OUTLIER).encode(w, threshold=6.0)
    assert sorted(enc.parts["outlier_cols"].tolist()) == [5, 40]
    out = decode_tensor(enc)
    assert torch.allclose(out[:, [5, 40]], w[:, [5, 40]].to(torch.bfloat16).float())
    # outliers do not inflate the row scales: the other columns stay accurate
    mask = torch.ones(64, dtype=torch.bool)
    mask[[5, 40]] = False
    assert tensor_error(w[:, mask], out[:, mask])["rel_mse"] < 2e-4
    no_thr = get_codec(CodecName.INT8_OUTLIER).encode(w, threshold=0.0)
    assert no_thr.parts["outlier_cols"].numel() == 0
    assert tensor_error(w[:, mask], decode_tensor(no_thr)[:, mask])["rel_mse"] > 10 * tensor_error(w[:, mask], out[:, mask])["rel_mse"]


def test_nf4_double_quant_is_smaller_and_close():
    w = _weight(rows=256, cols=512)
    dq = get_codec(CodecName.NF4).encode(w, double_quant=True)
    sq = get_codec(CodecName.NF4).encode(w, double_quant=False)
    assert dq.nbytes < sq.nbytes
    e_dq = tensor_error(w, decode_tensor(dq))["rel_mse"]
    e_sq = tensor_error(w, decode_tensor(sq))["rel_mse"]
    assert e_dq == pytest.approx(e_sq, rel=0.1)


def test_codecs_are_deterministic():
    w = _weight()
    for c in CodecName:
        a, b = get_codec(c).encode(w), get_codec(c).encode(w)
        assert a.parts.keys() == b.parts.keys()
        assert all(torch.equal(a.parts[k], b.parts[k]) for k in a.parts)


def test_tensor_error_chunked_matches_direct():
    w = _weight(rows=300, cols=70, dtype=torch.float32)
    a = w + 0.001 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    direct = float(((a - w) ** 2).mean() / (w**2).mean())
    before = a.clone()
    chunked = tensor_error(w, a, chunk_elems=500)
    assert torch.equal(a, before)  # inputs are never modified
    assert chunked["rel_mse"] == pytest.approx(direct, rel=1e-6)
    assert chunked["max_abs_err"] == pytest.approx(float((a - w).abs().max()))


def test_unknown_codec_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown codec 'zip9'"):
        get_codec("zip9")
    with pytest.raises(ValueError, match="needs a 2-D weight"):
        get_codec(CodecName.INT4_GROUP).encode(torch.zeros(8))


@pytest.mark.parametrize("codec", list(CodecName))
@pytest.mark.parametrize("cols", [256, 200])
def test_decode_into_a_buffer_equals_decode(codec, cols):
    """The executor decodes into preallocated slots; that path must give the same numbers."""
    from cache.record import decode_record, encode_record

    w = _weight(rows=48, cols=cols, seed=5)
    params = {"group_size": 64} if codec in (CodecName.INT4_GROUP, CodecName.INT3_GROUP, CodecName.INT2_GROUP) else {}
    enc = get_codec(codec).encode(w, **params)
    for level in (0, 3):  # zero-copy views of an uncompressed record, and a zstd one
        rec, _ = encode_record(enc, compress_level=level)
        back = decode_record("k", memoryview(rec), zero_copy=True)
        out = torch.full((48, cols), float("nan"))
        decode_tensor(back, out=out)
        assert torch.equal(out, decode_tensor(back, torch.float32)), (codec, cols, level)
    with pytest.raises(ValueError, match="out has shape"):
        decode_tensor(enc, out=torch.empty(3, 3))


def test_group_codec_writes_one_portable_layout_and_refuses_others():
    """int4 records are planar whatever their shape (no kernel's private layout on disk), and a
    record claiming another layout is refused rather than decoded wrongly."""
    codec = get_codec(CodecName.INT4_GROUP)
    for rows, cols in ((96, 192), (40, 192), (64, 130)):
        enc = codec.encode(_weight(rows=rows, cols=cols, seed=2), group_size=64)
        assert enc.params["layout"] == "planar"
        # planar: byte j of a row holds code j (low nibble) and code j + cols_padded/2 (high)
        half = enc.parts["packed"].shape[1]
        q = codec.unpack(enc)
        assert torch.equal(q[:, :half], enc.parts["packed"] & 15) and torch.equal(q[:, half:], enc.parts["packed"] >> 4)
    other = type(enc)(enc.codec, enc.shape, enc.dtype, enc.parts, enc.params | {"layout": "tinygemm"})
    with pytest.raises(ValueError, match="reads 'planar' only"):
        decode_tensor(other, torch.float32)
    with pytest.raises(ValueError, match="reads 'planar' only"):
        decode_tensor(other, out=torch.empty(enc.shape))


@pytest.mark.parametrize("codec,cols,gs", [(CodecName.INT4_GROUP, 256, 64), (CodecName.INT2_GROUP, 192, 32), (CodecName.INT4_GROUP, 200, 64),
                                           (CodecName.INT3_GROUP, 192, 64)])
def test_encode_measured_gives_encodes_bytes_and_the_decoded_error(codec, cols, gs):
    # the fused quantizer loop must write exactly what encode writes, and measure the error of
    # what decode gives back (cols=200 needs padding: the general path)
    w = (torch.randn(300, cols, generator=torch.Generator().manual_seed(3)) * 0.05).to(torch.bfloat16)
    c = get_codec(codec)
    enc, err = c.encode_measured(w, group_size=gs, chunk_elems=4096)  # several row chunks
    ref = c.encode(w, group_size=gs)
    assert enc.params == ref.params and enc.shape == ref.shape
    for k in ref.parts:
        assert torch.equal(enc.parts[k], ref.parts[k]), k
    want = tensor_error(w.float(), decode_tensor(ref, torch.float32))
    assert err["rel_mse"] == pytest.approx(want["rel_mse"], rel=2e-3)
    assert err["max_abs_err"] == pytest.approx(want["max_abs_err"], rel=1e-2, abs=1e-4)


@pytest.mark.parametrize("codec", list(CodecName))
def test_fake_quantize_is_decode_of_encode(codec):
    """Searches (AWQ's) round weights with fake_quantize, which skips packing: the same numbers."""
    w = _weight(rows=24, cols=200, seed=9, dtype=torch.float32)
    params = {"group_size": 32} if codec in (CodecName.INT4_GROUP, CodecName.INT3_GROUP, CodecName.INT2_GROUP) else {}
    for extra in ({}, {"symmetric": True}) if params else ({},):
        c = get_codec(codec)
        assert torch.equal(c.fake_quantize(w, **params, **extra), c.decode(c.encode(w, **params, **extra), torch.float32))
