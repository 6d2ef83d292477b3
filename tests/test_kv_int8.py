"""int8 KV blocks: the quantizer against a plain reference, the pool's round trip, the spill
round trip in the same form, capacity per budget, and quality against fp KV."""

import pytest
import torch

from conftest import make_tiny_model
from runtime.engine import EngineRequest
from runtime.generate import SamplingConfig
from runtime.kv import BlockPool, KVDtype, dequantize_kv, kv_token_bytes, pool_for, quantize_kv
from sli import QuantizationConfig, UniversalSLIProcessor


def reference_int8(x: torch.Tensor) -> torch.Tensor:
    """Per row: scale = absmax / 127 rounded to fp16; codes = round(x / scale) in [-127, 127]; back = codes * scale."""
    out = torch.empty_like(x, dtype=torch.float32)
    for i, row in enumerate(x.float().reshape(-1, x.shape[-1])):
        scale = float(torch.tensor(row.abs().max().item() / 127, dtype=torch.float16))
        codes = [max(-127, min(127, round(v / scale))) if scale > 0 else 0 for v in row.tolist()]
        out.view(-1, x.shape[-1])[i] = torch.tensor([c * scale for c in codes])
    return out


def test_int8_rows_equal_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=g) * torch.tensor([0.01, 1.0, 300.0])[:, None, None]
    x[1, 2] = 0  # a zero row
    x[2, 3, 5] = -2000.0  # an outlier sets its row's scale
    rows = quantize_kv(x)
    assert rows.dtype == torch.int8 and rows.shape == (3, 7, 18)  # 16 codes + the fp16 scale's two bytes
    assert torch.equal(dequantize_kv(rows, torch.float32), reference_int8(x))
    rel = (dequantize_kv(rows, torch.float32) - x).norm() / x.norm()
    assert rel < 0.01


def test_an_int8_pool_stores_and_gathers_what_the_reference_gives():
    pool = BlockPool(4, num_layers=2, kv_heads=2, head_dim=16, block_size=4, kv_dtype="int8")
    fp = BlockPool(4, num_layers=2, kv_heads=2, head_dim=16, block_size=4)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    a, b = pool.allocate(), pool.allocate()
    fa, fb = fp.allocate(), fp.allocate()
    slots = torch.tensor([b.index * 4 + 1, b.index * 4 + 2, b.index * 4 + 3, a.index * 4, a.index * 4 + 1, a.index * 4 + 2])
    pool.write(1, slots, k, v)
    fp.write(1, torch.tensor([fb.index * 4 + 1, fb.index * 4 + 2, fb.index * 4 + 3, fa.index * 4, fa.index * 4 + 1, fa.index * 4 + 2]), k, v)
    gk, gv = pool.read(1, torch.tensor([b.index, a.index]))
    assert torch.equal(gk[:, 1:7], reference_int8(k)) and torch.equal(gv[:, 1:7], reference_int8(v))
    fk, _ = fp.read(1, torch.tensor([fb.index, fa.index]))
    assert torch.equal(fk[:, 1:7], k)  # the fp pool keeps the values as they are


def test_int8_blocks_hold_about_twice_the_tokens_of_bf16_in_the_same_memory(tmp_path, tiny_root):
    p = UniversalSLIProcessor(make_tiny_model(tiny_root, "llama", layers=3, hidden=256), quantization_config=QuantizationConfig(mode="none"),
                              cache_dir=tmp_path, memory_budget=1 << 40, context_tokens=512, dtype="bfloat16", progress=False)
    m = p.load()  # head_dim 64, as the real model's
    fp, q = pool_for(m), pool_for(m, kv_dtype=KVDtype.INT8)
    assert q.bytes <= fp.bytes and q.num_blocks / fp.num_blocks >= 1.9
    assert kv_token_bytes(m.config, m.dtype) / kv_token_bytes(m.config, m.dtype, "int8") == pytest.approx(128 / 66)
    p.close()


def test_int8_kv_runs_twice_the_sequences_and_stays_close_to_fp_kv(tmp_path, tiny_root):
    path = make_tiny_model(tiny_root, "llama", layers=3, hidden=128, seed=5)  # head_dim 32
    prompts = [[5 + (i * 13 + j * 7) % 290 for j in range(30)] for i in range(16)]  # 30 + 2 new: two blocks each
    got = {}
    for kv in ("auto", "int8"):
        p = UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode="none"), cache_dir=tmp_path / kv, memory_budget=1 << 40,
                                  context_tokens=160, dtype="bfloat16", kv_dtype=kv, progress=False)
        core = p.engine().core
        outs = {}
        for i, x in enumerate(prompts):
            outs[i] = []
            core.add(EngineRequest(tuple(x), SamplingConfig(max_new_tokens=2), prompt_logprobs=0), outs[i].append)
        while core.has_work:
            core.step()
        got[kv] = (core.pool.num_blocks, core.stats.max_batch,
                   torch.tensor([[lp.logprob for lp in outs[i][0].prompt_logprobs[1:]] for i in range(16)]))
        p.close()
    (fp_blocks, fp_batch, fp_lp), (q_blocks, q_batch, q_lp) = got["auto"], got["int8"]
    assert (fp_blocks, fp_batch) == (10, 5)  # 160 tokens of bf16 KV: five sequences at once
    assert q_blocks == 18 and q_batch == 9  # the same memory in int8 blocks: nine
    assert (q_lp - fp_lp).abs().max() < 0.05  # prompt log-probabilities through int8 KV, against bf16 KV


def test_int8_blocks_spill_and_reload_in_the_same_form(tmp_path, tiny_root):
    path = make_tiny_model(tiny_root, "llama", layers=3, seed=5)
    kw = dict(quantization_config=QuantizationConfig(mode="none"), cache_dir=tmp_path / "c", memory_budget=1 << 40,
              context_tokens=128, kv_dtype="int8", progress=False)
    prompt = [5 + (i * 11) % 250 for i in range(70)]
    p = UniversalSLIProcessor(path, **kw)
    want = p.generate(prompt, max_new_tokens=5)
    pool = p.prefix_session().pool
    stored = {h: pool.block(i).clone() for h, i in pool.by_hash.items()}
    p.close()
    p = UniversalSLIProcessor(path, **kw)  # a new pool: the blocks come back from the spill store
    r = p.generate(prompt, max_new_tokens=5)
    assert r.stats.disk_cached_tokens == 64 and r.token_ids == want.token_ids
    pool = p.prefix_session().pool
    for h, i in pool.by_hash.items():
        if h in stored:
            assert torch.equal(pool.block(i), stored[h])  # codes and scales, byte for byte
    p.close()


@pytest.mark.slow
@pytest.mark.real
def test_int8_kv_perplexity_within_half_a_percent_of_fp_kv(real_model, tmp_path):
    from runtime.evaluate import default_text, paged_perplexity

    p = UniversalSLIProcessor(real_model, quantization_config=QuantizationConfig(mode="none"), cache_dir=tmp_path, dtype="float32",
                              context_tokens=1024, progress=False)
    m = p.load()
    ids = torch.tensor(p.tokenizer(default_text())["input_ids"][:1536])
    fp = paged_perplexity(m, ids, pool_for(m), max_length=512)
    q = paged_perplexity(m, ids, pool_for(m, kv_dtype="int8"), max_length=512)
    assert fp.tokens_scored == q.tokens_scored == 1535
    assert q.perplexity / fp.perplexity - 1 <= 0.005
    p.close()
