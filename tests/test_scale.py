"""At scale (slow suite): a random model in Llama-3.2-1B's shapes, quantized with bounded
memory, streamed at a quarter of its int4 size, and run inside a hard memory limit."""

import shutil
from pathlib import Path

import pytest

from sli.bench_scale import CGROUP_MARGIN, MemoryCgroup, _run, drop_caches, import_baseline
from sli.synthetic import SHAPES, write_model

pytestmark = pytest.mark.slow

SHAPE = SHAPES["1b"]
LAYER_BF16 = 2 * (2 * SHAPE.hidden * SHAPE.heads * SHAPE.head_dim + 2 * SHAPE.hidden * SHAPE.kv_heads * SHAPE.head_dim
                  + 3 * SHAPE.hidden * SHAPE.intermediate)


@pytest.fixture(scope="module")
def scale_model(tmp_path_factory, real_model) -> Path:
    root = tmp_path_factory.mktemp("scale")
    if shutil.disk_usage(root).free < 8e9:
        pytest.skip("the 1 B scale tests need about 8 GB of free disk")
    path = root / "llama-1b-shape"
    write_model(path, SHAPE, vocab=49152, tokenizer_from=real_model)
    return path


@pytest.fixture(scope="module")
def int4_cache(scale_model) -> tuple[Path, dict]:
    cache = scale_model.parent / "cache-int4"
    drop_caches([scale_model])
    res, err = _run({"kind": "quantize", "model": str(scale_model), "mode": "int4", "cache_dir": str(cache)}, 1800)
    assert not err, err
    return cache, res


def test_quantizing_holds_a_group_and_a_layer_at_most(int4_cache):
    """A group commits whole, so LMDB holds its records until the commit while the next
    layer is quantized: the bound is the largest group as stored plus one layer in bf16.
    Here the largest group is the tied embedding kept in bf16 (201 MB); for an 8 B model the
    same bound is under two of its layers in bf16 (measured: 524 MB against 872 MB)."""
    from cache import LayerStore

    cache, res = int4_cache
    with LayerStore(cache, readonly=True) as st:
        m = st.require_manifest(st.list_variants()[0])
        largest = max(g.stored_bytes for g in m.groups)
    assert res["peak_anon_bytes"] <= largest + LAYER_BF16, (res["peak_anon_bytes"] / 1e6, largest / 1e6, LAYER_BF16 / 1e6)


def _generate(model: Path, cache: Path, budget: str, cgroup=None) -> dict:
    spec = {"kind": "sli", "model": str(model), "mode": "int4", "cache_dir": str(cache), "budget": budget,
            "context_tokens": 96, "prompt_tokens": 48, "new_tokens": 8}
    res, err = _run(spec, 1800, cgroup)
    assert not err, err
    return res


def test_a_quarter_of_the_int4_size_gives_the_holds_all_tokens(scale_model, int4_cache):
    cache, _ = int4_cache
    everything = _generate(scale_model, cache, "64GB")
    size = sum(f.stat().st_size for f in cache.glob("*.mdb"))  # the portable records (the derived copy aside)
    quarter = _generate(scale_model, cache, f"{size // 4}")
    assert quarter["streamed_layers"] > 0 and everything["streamed_layers"] == 0
    assert quarter["tokens"] == everything["tokens"]
    assert quarter["peak_anon_bytes"] <= size // 4 + (40 << 20)


def test_under_a_hard_memory_limit_the_tokens_are_the_same(scale_model, int4_cache):
    cache, _ = int4_cache
    budget = 400 << 20
    try:
        cg = MemoryCgroup(budget + import_baseline(scale_model) + CGROUP_MARGIN)
    except OSError as e:
        pytest.skip(f"no memory cgroup can be made here: {e}")
    try:
        drop_caches([cache])
        limited = _generate(scale_model, cache, str(budget), cg)
        peak = cg.peak_bytes()
    finally:
        cg.close()
    assert limited["tokens"] == _generate(scale_model, cache, "64GB")["tokens"]
    assert peak is None or peak <= cg.limit_bytes
    assert limited["disk_bytes_per_token"] > 0  # it really read from disk, cold
