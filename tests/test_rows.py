"""The int4 linear that picks its kernel by rows: dequantize + GEMM against the dequantized
reference on both sides of the crossover, the crossover measured once, stored, reread and
measured again when its key changes, the plan that must have room for the path, and the
same numbers under every CPU capability."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cache import CodecName, LayerStore, get_codec
from conftest import dequantized_reference, make_tiny_model
from runtime.budget import BudgetPlan, PageCacheRoom
from runtime.executor import StreamingModel
from runtime.kernels import Int4CpuKernel, KernelError
from runtime.rows import (CROSSOVER_FILE, ROW_COUNTS, CrossoverTable, Int4Codes, RowsKernel, crossover_key, first_win, plan_rows,
                          rows_matmul, shape_key)
from sli import QuantizationConfig, UniversalSLIProcessor
from test_kernels import ROOT, _env, supported_capabilities

CODEC = get_codec(CodecName.INT4_GROUP)


def _encs(rows: tuple[int, ...], k: int, gs: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [CODEC.encode(torch.randn(n, k, generator=gen) * 0.05, group_size=gs) for n in rows]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("rows,k,gs", [((96,), 256, 32), ((48, 80, 16), 512, 64), ((256,), 1536, 128)])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_dequantize_gemm_matches_the_dequantized_weight(rows, k, gs, m):
    """Tiles of 16 rows cross every record boundary; stacked records give the stacked product."""
    encs = _encs(rows, k, gs, seed=k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    ref = x.float() @ torch.cat([CODEC.decode(e, torch.float32) for e in encs]).T
    got = rows_matmul(x, Int4Codes.of(encs), tile=torch.empty(16 * k, dtype=torch.bfloat16))
    assert got.shape == (m, sum(rows)) and got.dtype == torch.bfloat16
    assert _rel(got, ref) < 0.01
    # batched activations keep their leading dims
    assert torch.equal(rows_matmul(x.view(1, m, k), Int4Codes.of(encs)).view(m, -1), rows_matmul(x, Int4Codes.of(encs)))


def test_codes_that_are_not_planar_int4_are_refused():
    enc = _encs((32,), 128, 32, seed=1)[0]
    permuted = CODEC.encode(torch.randn(32, 128), group_size=32, permute="weight")
    with pytest.raises(ValueError, match="planar, unpermuted int4"):
        Int4Codes.of([enc, permuted])
    with pytest.raises(ValueError, match="one width"):
        Int4Codes.of([enc, _encs((32,), 256, 32, seed=2)[0]])


def _weight(rows=(64, 64), k=256, gs=64, seed=5):
    encs = _encs(rows, k, gs, seed)
    stacked = type(encs[0])(encs[0].codec, (sum(rows), k), encs[0].dtype,
                            {p: torch.cat([e.parts[p] for e in encs]) for p in encs[0].parts}, encs[0].params)
    w = Int4CpuKernel.pack(stacked)
    return type(w)(w.packed, w.scales_and_zeros, w.group_size, codes=Int4Codes.of(encs)), stacked


def test_the_kernel_is_chosen_by_rows_on_both_sides_of_the_crossover(tmp_path):
    w, enc = _weight()
    crossover = 8
    table = CrossoverTable(tmp_path / CROSSOVER_FILE, {shape_key(128, 256, 64): crossover})
    kernel = RowsKernel(table)
    ref_w = CODEC.decode(enc, torch.float32)
    for m in (1, 4, 7, 8, 9, 33):
        before = dict(kernel.calls)
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        got = kernel.matmul(x, w)
        path = "rows" if m >= crossover else "packed"
        assert kernel.calls[path] == before[path] + 1, (m, kernel.calls)
        assert _rel(got, x.float() @ ref_w.T) < 0.01
    # a weight without codes (a streamed layer, the head) and a table without its shape stay packed
    bare = type(w)(w.packed, w.scales_and_zeros, w.group_size)
    x = torch.randn(64, 256).to(torch.bfloat16)
    assert not kernel.uses_rows(bare, 64) and not RowsKernel(CrossoverTable(tmp_path / "x.json")).uses_rows(w, 64)
    assert not RowsKernel().active and RowsKernel().scratch_bytes == 0 and kernel.scratch_bytes > 0


def test_a_rows_path_that_gives_wrong_numbers_is_refused(monkeypatch):
    import runtime.rows as rows

    real = rows._dequantize_rows
    monkeypatch.setattr(rows, "_dequantize_rows", lambda p, s, o, gs, out: real(p.flip(0), s, o, gs, out))
    monkeypatch.setattr(RowsKernel, "_proved", {})
    with pytest.raises(KernelError, match="rows path .* gives wrong numbers"):
        RowsKernel.prove()


def test_bisection_finds_the_first_win_and_asks_few():
    for first in (*ROW_COUNTS, None):
        asked = []

        def wins(m, first=first):
            asked.append(m)
            return first is not None and m >= first

        assert first_win(wins) == first
        assert len(asked) <= 1 + (len(ROW_COUNTS) - 1).bit_length()


def test_crossover_is_stored_reread_and_measured_again_when_its_key_changes(tmp_path, monkeypatch):
    path = tmp_path / "derived" / CROSSOVER_FILE
    measured = []

    def fake(n, k, gs, *, tile=None):
        measured.append((n, k, gs))
        return 16 if n > 100 else None

    t = CrossoverTable.load(path).ensure({(128, 256, 64), (64, 256, 64)}, measure=fake)
    assert t.crossover(128, 256, 64) == 16 and t.crossover(64, 256, 64) is None and len(measured) == 2
    assert json.loads(path.read_text())["key"] == crossover_key()
    again = CrossoverTable.load(path).ensure({(128, 256, 64), (64, 256, 64)}, measure=fake)
    assert again.rows == t.rows and len(measured) == 2  # reread, nothing measured
    CrossoverTable.load(path).ensure({(128, 256, 64), (256, 512, 32)}, measure=fake)
    assert measured[2:] == [(256, 512, 32)]  # only the new shape
    real_key = crossover_key()
    for field, value in (("torch", "0.0.0-other"), ("capability", "AVX2-other"), ("cpu", "another CPU"), ("threads", 64)):
        monkeypatch.setattr("runtime.rows.crossover_key", lambda f=field, v=value: {**real_key, f: v})
        n = len(measured)
        t2 = CrossoverTable.load(path)
        assert t2.rows == {}, field  # another torch, CPU or thread count: the stored table does not count
        t2.ensure({(128, 256, 64)}, measure=fake)
        assert len(measured) == n + 1
        monkeypatch.undo()
    path.write_text("{not json")
    assert CrossoverTable.load(path).rows == {}


def test_the_plan_must_have_room_for_the_rows_path():
    plan = BudgetPlan(1000, {"kv cache": 100}, 0, 2, ("layer.0", "head"), (), 50, 0, mapped=("layer.0",), mapped_bytes=300,
                      page_cache="test")
    roomy, why = plan_rows(plan, PageCacheRoom(2000, "test"), 300, 20)
    assert roomy is not None and roomy.fixed["rows scratch"] == 20 and roomy.mapped_bytes == 600 and "planned" in why
    assert roomy.planned_bytes == plan.planned_bytes + 20
    tight, why = plan_rows(plan, PageCacheRoom(700, "test"), 300, 20)  # 700 - 170 anon - 300 mapped leaves 230 < 300
    assert tight is None and "no room" in why and "230" not in why  # MiB figures
    in_budget, _ = plan_rows(plan, None, 300, 20)  # no page-cache room: the codes count in the budget
    assert in_budget is not None and in_budget.resident_bytes == 350
    assert plan_rows(plan, None, 900, 20)[0] is None
    assert plan_rows(plan, None, 0, 20)[0] is None
    # compressed codes are decompressed into memory: the budget holds them, not the page cache
    held, why = plan_rows(plan, PageCacheRoom(2000, "test"), 0, 20, held_bytes=100)
    assert held is not None and held.resident_bytes == 150 and held.mapped_bytes == 300 and "held" in why
    assert plan_rows(plan, PageCacheRoom(2000, "test"), 0, 20, held_bytes=900)[0] is None  # 170 + 900 > the 1000 budget


def _write_table(m: StreamingModel, crossover: int | None) -> None:
    shapes = {(d.shape[0], d.in_features, d.group_size) for ds in m.layout.values() for d in ds if d.planes == 1}
    CrossoverTable(m.derived.path / CROSSOVER_FILE, {shape_key(*s): crossover for s in shapes}).save()


def test_streaming_model_runs_prefill_on_the_rows_path(tmp_path, tiny_root):
    """Prefill (24 rows) on dequantize + GEMM, decode (1 row) on the packed kernel: the logits
    follow the packed-only run and the dequantized fp32 reference."""
    path = make_tiny_model(tiny_root, "llama", layers=2, seed=41, hidden=128)
    qc = QuantizationConfig(mode="int4", group_size=32)
    r = UniversalSLIProcessor(path, quantization_config=qc, cache_dir=tmp_path, progress=False).quantize()
    ids = torch.randint(4, 300, (1, 24), generator=torch.Generator().manual_seed(6))
    kw = dict(memory_budget=1 << 40, dtype=torch.bfloat16, context_tokens=64)
    with LayerStore(tmp_path, readonly=True) as st:
        with torch.no_grad():
            want = dequantized_reference(path, st, r.variant_id)(ids).logits
        off = StreamingModel(st, r.variant_id, rows_kernel=False, **kw)
        assert off.rows_reason == "turned off" and not off.rows_kernel.active
        base = off.logits(ids)
        assert off.rows_kernel.calls["rows"] == 0 and off.rows_kernel.calls["packed"] > 0
        _write_table(off, 8)
        m = StreamingModel(st, r.variant_id, rows_kernel=True, **kw)
        assert m.rows_kernel.active and "rows scratch" in m.plan.fixed
        got = m.logits(ids)
        assert m.rows_kernel.calls["rows"] == 2 * 4  # qkv, o, gate+up, down of both layers
        m.logits(ids[:, :3])  # 3 rows: under the crossover
        assert m.rows_kernel.calls["rows"] == 8
        m.close()
        # a table that says the packed kernel always wins: the path stays off, and True is an error
        _write_table(off, None)
        off.close()
        assert "measured faster" in StreamingModel(st, r.variant_id, **kw).rows_reason
        with pytest.raises(ValueError, match="rows_kernel=True, but"):
            StreamingModel(st, r.variant_id, rows_kernel=True, **kw)
    assert ((got - base).norm() / base.norm()).item() < 0.02
    assert ((got - want).norm() / want.norm()).item() < 0.02


def test_rows_path_on_every_cpu_capability():
    """Proof, numbers and the kernel choice in a fresh process per capability."""
    code = (
        "import torch, tempfile, pathlib\n"
        "from cache import CodecName, get_codec\n"
        "from runtime.kernels import Int4CpuKernel\n"
        "from runtime.rows import RowsKernel, CrossoverTable, Int4Codes, shape_key\n"
        "print(RowsKernel.prove())\n"
        "enc = get_codec(CodecName.INT4_GROUP).encode(torch.randn(192, 512), group_size=64)\n"
        "w = Int4CpuKernel.pack(enc)\n"
        "w = type(w)(w.packed, w.scales_and_zeros, w.group_size, codes=Int4Codes.of([enc]))\n"
        "k = RowsKernel(CrossoverTable(pathlib.Path(tempfile.mkdtemp()) / 't.json', {shape_key(192, 512, 64): 16}))\n"
        "ref = get_codec(CodecName.INT4_GROUP).decode(enc, torch.float32)\n"
        "for m in (1, 15, 16, 40):\n"
        "    x = torch.randn(m, 512).bfloat16()\n"
        "    y = k.matmul(x, w).float(); r = x.float() @ ref.T\n"
        "    print(float((y - r).norm() / r.norm()))\n"
        "print(k.calls['packed'], k.calls['rows'])\n"
    )
    for c in supported_capabilities():
        r = subprocess.run([sys.executable, "-c", code], env=_env(c), capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, (c, r.stderr[-2000:])
        out = r.stdout.split()
        errors = [float(x) for x in out[:5]]
        assert max(errors) < 0.01, (c, errors)
        assert out[5:] == ["2", "2"], (c, out)
