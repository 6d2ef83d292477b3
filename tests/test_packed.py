"""Packed weights used in place: an int8 head split into two int4 planes, stacked projections,
embedding rows decoded alone, and the plan that keeps mapped weights in the page cache."""

from __future__ import annotations

import pytest
import torch

from cache import CodecName, LayerStore, get_codec
from cache.codecs import decode_rows
from conftest import dequantized_reference, make_tiny_model
from runtime.budget import BudgetTooSmallError, MemoryBudget, PageCacheRoom, Unit
from runtime.executor import StreamingModel
from runtime.generate import GenerationOutput, SamplingConfig, stream
from runtime.kernels import Int4CpuKernel, KernelError
from sli import QuantizationConfig, UniversalSLIProcessor

CTX = 64


def _quantize(path, cache, **cfg):
    qc = QuantizationConfig(mode="int4", group_size=32, **cfg)
    return UniversalSLIProcessor(path, quantization_config=qc, cache_dir=cache, progress=False).quantize()


@pytest.mark.parametrize("shape", [(320, 576), (128, 96), (256, 2048)])
def test_int8_rows_as_two_int4_planes_match_the_int8_weights(shape):
    """The split gives the int8 weights' product (bf16 output rounding only), whole and by row pieces."""
    gen = torch.Generator().manual_seed(shape[1])
    w = torch.randn(*shape, generator=gen) * 0.05
    enc = get_codec(CodecName.INT8_CHANNEL).encode(w, scale_dtype=torch.bfloat16)
    assert (enc.parts["scale"].float() * 127 >= w.abs().amax(1)).all() and enc.parts["q"].abs().max() <= 127
    packed = Int4CpuKernel.split_int8(enc)
    assert packed.planes == 2 and packed.out_features == shape[0]
    x = torch.randn(5, shape[1], generator=gen).to(torch.bfloat16)
    ref = x.float() @ get_codec(CodecName.INT8_CHANNEL).decode(enc, torch.float32).T
    got = Int4CpuKernel.matmul(x, packed).float()
    assert ((got - ref).norm() / ref.norm()).item() < 5e-3  # bf16 output rounding of each half
    piece = Int4CpuKernel.matmul(x, packed.rows(64, 128)).float()
    assert ((piece - ref[:, 64:128]).norm() / ref[:, 64:128].norm()).item() < 5e-3
    assert Int4CpuKernel.check(enc, packed, "test") < 5e-3


def test_a_scrambled_split_is_refused():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(3))
    enc = get_codec(CodecName.INT8_CHANNEL).encode(w, scale_dtype=torch.bfloat16)
    packed = Int4CpuKernel.split_int8(enc)
    wrong = type(packed)(packed.packed.flip(0), packed.scales_and_zeros, packed.group_size, packed.planes)
    with pytest.raises(KernelError, match="gives wrong numbers"):
        Int4CpuKernel.check(enc, wrong, "a scrambled split")


@pytest.mark.parametrize("codec,params", [(CodecName.RAW, {}), (CodecName.INT8_CHANNEL, {"scale_dtype": torch.bfloat16}),
                                          (CodecName.INT4_GROUP, {"group_size": 32}), (CodecName.INT8_OUTLIER, {"threshold": 2.0})])
def test_rows_decode_alone(codec, params):
    w = torch.randn(200, 64, generator=torch.Generator().manual_seed(7))
    enc = get_codec(codec).encode(w, **params)
    rows = torch.tensor([0, 3, 199, 57])
    whole = get_codec(codec).decode(enc, torch.float32)
    assert torch.equal(decode_rows(enc, rows, torch.float32), whole[rows])


def test_rows_of_a_block_codec_are_refused():
    enc = get_codec(CodecName.NF4).encode(torch.randn(64, 64))
    with pytest.raises(ValueError, match="does not decode single rows"):
        decode_rows(enc, torch.tensor([1]), torch.float32)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_stacked_projections_give_the_unstacked_numbers(tmp_path, tiny_root, model_type):
    """q/k/v and gate/up as one kernel call each (qwen2: with their biases) give what seven
    calls give, and both follow the dequantized reference."""
    path = make_tiny_model(tiny_root, model_type, layers=2, seed=5, hidden=128)
    r = _quantize(path, tmp_path)
    ids = torch.randint(4, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with LayerStore(tmp_path, readonly=True) as st:
        ref = dequantized_reference(path, st, r.variant_id)
        with torch.no_grad():
            want = ref(ids).logits
        got = {}
        for fuse in (True, False):
            m = StreamingModel(st, r.variant_id, memory_budget=1 << 40, dtype=torch.bfloat16, context_tokens=CTX, fuse=fuse)
            assert any(d.fused for items in m.layout.values() for d in items) == fuse
            got[fuse] = m.logits(ids)
            m.close()
    assert (got[True] - got[False]).abs().max().item() < 2e-2
    for g in got.values():
        assert ((g - want).norm() / want.norm()).item() < 0.02


def test_planner_keeps_mapped_units_in_the_page_cache():
    """Mapped bytes go to the page-cache room, the rest to the budget; with no room given they
    count against the budget, as everything else does."""
    units = [Unit(f"layer.{i}", 100, 60, mapped_bytes=90) for i in range(4)] + [Unit("head", 50, 50, uses_slot=False, mapped_bytes=50)]
    fixed = {"kv cache": 100}
    roomy = MemoryBudget(200).plan(units, fixed=fixed, page_cache=PageCacheRoom(1000, "test"))
    assert not roomy.streaming and roomy.mapped == tuple(u.name for u in units)
    assert roomy.resident_bytes == 4 * 10 and roomy.mapped_bytes == 4 * 90 + 50 and roomy.planned_bytes == 140
    # the same budget without a page cache: 100 fixed + 2 slots of 100 leave nothing
    with pytest.raises(BudgetTooSmallError):
        MemoryBudget(200).plan(units, fixed=fixed)
    # 410 mapped do not fit 500 - 140: stream. Slots of 10 (the anonymous part), 3 x 60 of records
    # in flight; the head (1.0 bytes saved per byte) first, then layer.0; layer.1 would pass 500 - 140
    tight = MemoryBudget(200).plan(units, fixed=fixed, page_cache=PageCacheRoom(500, "test"))
    assert tight.streaming and tight.slot_bytes == 10 and tight.inflight_bytes == 180
    assert tight.mapped == ("layer.0", "head") and tight.streamed == ("layer.1", "layer.2", "layer.3")
    assert tight.planned_bytes == 130 and tight.mapped_bytes + tight.inflight_bytes <= 500 - tight.planned_bytes
    # an explicit page-cache size is room for mapped bytes alone, whatever the budget holds
    fixed_room = MemoryBudget(400).plan(units, fixed=fixed, page_cache=PageCacheRoom(300, "asked", shared=False))
    assert fixed_room.mapped == ("head",) and fixed_room.streamed_layers == (0, 1, 2, 3)


def test_page_cache_room_decides_what_streams_and_the_logits_do_not_change(tmp_path, tiny_root):
    path = make_tiny_model(tiny_root, "llama", layers=8, seed=8, hidden=256)  # layers outweigh the streaming buffers
    r = _quantize(path, tmp_path)
    ids = torch.randint(4, 300, (1, 20), generator=torch.Generator().manual_seed(4))
    with LayerStore(tmp_path, readonly=True) as st:
        # the smallest chunk (the budget cannot shrink it); one kernel whatever the plan: where the
        # crossover is under 16 rows (ATEN_CPU_CAPABILITY=default, avx2) the rows path is on only
        # where the plan has room for it, and a different kernel rounds bf16 differently
        kw = {"dtype": torch.bfloat16, "context_tokens": CTX, "prefill_chunk": 16, "rows_kernel": False}
        probe = StreamingModel(st, r.variant_id, memory_budget=1 << 40, page_cache=0, **kw)
        low = probe.full_bytes - 1  # one byte short of keeping everything in the budget
        want = probe.logits(ids)
        probe.close()
        runs = {}
        for room in (0, "auto"):
            m = StreamingModel(st, r.variant_id, memory_budget=low, page_cache=room, **kw)
            runs[room] = (len(m.plan.streamed_layers), set(m.plan.mapped))
            assert torch.equal(m.logits(ids), want), room
            m.close()
    assert runs[0][0] >= 1  # no room: mapped bytes count against the budget, which cannot keep everything
    assert runs["auto"] == (0, {f"layer.{i}" for i in range(8)} | {"head"})  # the host's page cache keeps it all


def test_a_mapped_model_reads_nothing_per_token(tmp_path, tiny_root):
    path = make_tiny_model(tiny_root, "llama", layers=3, seed=9, hidden=128)
    r = _quantize(path, tmp_path)
    with LayerStore(tmp_path, readonly=True) as st:
        m = StreamingModel(st, r.variant_id, memory_budget="64MB", dtype=torch.bfloat16, context_tokens=CTX)
        assert not m.plan.streaming and m.plan.mapped
        out = GenerationOutput()
        for _ in stream(m, torch.tensor([[5, 6, 7, 8]]), SamplingConfig(max_new_tokens=6), out):
            pass
        assert out.stats.new_tokens == 6 and out.stats.bytes_read_per_token == 0
        m.close()
