"""Paged KV: the block pool, prefix reuse, spill to disk, and the chat session."""

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cache.kvstore import KVSpillStore
from conftest import make_tiny_model
from runtime.generate import GenerationOutput, SamplingConfig, generate
from runtime.kv import BlockPool, PoolExhaustedError, PrefixCachingSession, block_hash
from sli import QuantizationConfig, UniversalSLIProcessor


def _pool(n=4, bs=4, **kw):
    return BlockPool(n, num_layers=2, kv_heads=1, head_dim=2, block_size=bs, **kw)


def test_hash_chain_depends_on_the_whole_prefix_and_the_model():
    a = block_hash(None, [1, 2, 3, 4], "m")
    assert block_hash(None, [1, 2, 3, 4], "m") == a
    assert block_hash(None, [1, 2, 3, 5], "m") != a and block_hash(None, [1, 2, 3, 4], "other") != a
    assert block_hash(a, [5, 6, 7, 8], "m") != block_hash(block_hash(None, [9, 2, 3, 4], "m"), [5, 6, 7, 8], "m")


def test_ref_counts_lru_order_and_exhaustion():
    evicted = []
    pool = _pool(3, on_evict=lambda h, d: evicted.append(h))
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    with pytest.raises(PoolExhaustedError, match="all 3 KV blocks"):
        pool.allocate()
    for blk, h in ((a, b"A"), (b, b"B"), (c, b"C")):
        pool.register(blk, h)
    pool.release(b)
    pool.release(a)  # free queue, oldest first: b, a
    assert pool.lookup(b"A") is a and a.ref_count == 1  # a cached block is found and taken back
    d = pool.allocate()  # evicts b, the least recently used unreferenced block
    assert d is b and evicted == [b"B"] and pool.lookup(b"B") is None and d.hash is None
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(pool.blocks[c.index]) or pool.release(pool.blocks[c.index])


@pytest.fixture()
def tiny(tmp_path, tiny_root):
    path = make_tiny_model(tiny_root, "llama", layers=3, seed=17)
    p = UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode="none"), cache_dir=tmp_path / "c",
                              memory_budget=1 << 40, context_tokens=128, progress=False)
    yield p
    p.close()


def test_second_request_reuses_the_shared_prefix_and_matches(tiny):
    prefix = [5 + (i * 7) % 200 for i in range(40)]
    first = tiny.generate(prefix + [11, 12], max_new_tokens=4)
    assert first.stats.cached_tokens == 0 and first.stats.prefill_tokens == 42
    again = tiny.generate(prefix + [11, 12, 13], max_new_tokens=4)
    assert again.stats.cached_tokens == 32 and again.stats.prefill_tokens == 11  # two full blocks of 16 reused
    fresh = tiny.generate(prefix + [11, 12, 13], max_new_tokens=4, prefix_cache=False)
    assert fresh.stats.cached_tokens == 0 and fresh.token_ids == again.token_ids
    # the same logits as a fresh prefill of the whole prompt
    m = tiny.model
    session = tiny.prefix_session()
    ids = torch.tensor([prefix + [11, 12, 13]])
    cache, cached, _ = session.start(ids[0].tolist())
    assert cached == 32
    from runtime.generate import prefill

    got, cache = prefill(m, ids[:, cached:], cache=cache)
    session.finish(cache, ids[0].tolist())
    want = m.logits(ids)[:, -1]
    assert (got - want).abs().max().item() < 1e-4


def test_spilled_blocks_restore_in_a_new_process_and_corrupt_ones_are_recomputed(tmp_path, tiny_root):
    path = make_tiny_model(tiny_root, "llama", layers=3, seed=17)
    prompt = [5 + (i * 11) % 250 for i in range(70)]
    kw = dict(quantization_config=QuantizationConfig(mode="none"), cache_dir=tmp_path / "c", memory_budget=1 << 40,
              context_tokens=128, progress=False)
    p = UniversalSLIProcessor(path, **kw)
    want = p.generate(prompt, max_new_tokens=5)
    p.close()
    # a new process: nothing in memory, the blocks come from disk
    code = (
        "import sys, json; sys.path[:0] = [%r]; from sli import UniversalSLIProcessor, QuantizationConfig; "
        "p = UniversalSLIProcessor(%r, quantization_config=QuantizationConfig(mode='none'), cache_dir=%r, "
        "memory_budget=1 << 40, context_tokens=128, progress=False); r = p.generate(%r, max_new_tokens=5); "
        "print(json.dumps([r.token_ids, r.stats.cached_tokens, r.stats.disk_cached_tokens]))"
    ) % (os.getcwd(), str(path), str(tmp_path / "c"), prompt)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    import json

    ids, cached, disk = json.loads(out.stdout.strip().splitlines()[-1])
    assert ids == want.token_ids and cached == disk == 64
    # restored blocks give the logits of a fresh prefill (a new pool in this process, blocks from disk)
    from runtime.generate import prefill

    p = UniversalSLIProcessor(path, **kw)
    session = p.prefix_session()
    cache, cached, disk = session.start(prompt)
    assert cached == disk == 64
    got, cache = prefill(p.model, torch.tensor([prompt[cached:]]), cache=cache)
    session.finish(cache, prompt)
    assert (got - p.model.logits(torch.tensor([prompt]))[:, -1]).abs().max().item() < 1e-4
    p.close()
    # corrupt every spilled block: they are recomputed, never served
    store = KVSpillStore(tmp_path / "c" / "kv-spill")
    with store.env.begin(write=True) as txn:
        for k, v in list(txn.cursor(db=store._blocks)):
            bad = bytearray(v)
            bad[-3] ^= 0xFF
            txn.put(k, bytes(bad), db=store._blocks)
    store.close()
    p = UniversalSLIProcessor(path, **kw)
    r = p.generate(prompt, max_new_tokens=5)
    assert r.stats.cached_tokens == 0 and r.token_ids == want.token_ids
    assert p._spill.corrupt >= 1
    p.close()


def test_spill_store_keeps_to_its_limit(tmp_path):
    store = KVSpillStore(tmp_path / "s", limit_bytes=3000)
    blocks = [torch.randn(100, generator=torch.Generator().manual_seed(i)) for i in range(10)]  # ~600 bytes each
    for i in range(10):
        store.put(bytes([i]) * 16, blocks[i])
    assert store.total_bytes <= 3000 and store.evicted > 0
    assert bytes([9]) * 16 in store and bytes([0]) * 16 not in store  # oldest went first
    got = store.get(bytes([9]) * 16, shape=(100,), dtype=torch.float32)
    assert torch.equal(got, blocks[9])
    store.close()


def test_pool_too_small_for_a_request_is_a_clear_error(tmp_path, tiny_root):
    path = make_tiny_model(tiny_root, "llama", layers=2, seed=2)
    p = UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode="none"), cache_dir=tmp_path, memory_budget=1 << 40,
                              context_tokens=32, progress=False)
    with pytest.raises(ValueError, match="reserves 32 tokens"):
        p.generate(list(range(4, 34)), max_new_tokens=8)
    p.close()


@pytest.mark.real
def test_chat_reuses_earlier_turns(real_model, tmp_path):
    p = UniversalSLIProcessor(real_model, quantization_config="nf4", cache_dir=tmp_path, memory_budget="160MB", progress=False)
    system = ("You are a concise assistant for a small astronomy club. Answer in one short sentence, "
              "name real objects only, and never repeat an answer you already gave in this conversation. ") * 2
    chat = p.chat(system_prompt=system)
    r1 = chat.send("Name one planet.", max_new_tokens=12)
    r2 = chat.send("And one more?", max_new_tokens=12)
    assert r1.text and r2.text and len(chat.messages) == 4
    assert r1.stats.cached_tokens == 0 and r1.stats.prompt_tokens > 60
    # turn 2 reuses every full block of turn 1's prompt (all but its last partial block)
    assert r2.stats.cached_tokens >= (r1.stats.prompt_tokens // 16) * 16
    assert r2.stats.cached_tokens + r2.stats.prefill_tokens == r2.stats.prompt_tokens
    assert r2.stats.prefill_tokens < r2.stats.prompt_tokens / 2
    p.close()


@pytest.mark.real
def test_chat_script_in_a_terminal(real_model, tmp_path):
    """scripts/chat.py driven through a pseudo-terminal: answer, /stats, Ctrl-C, /reset, end of input."""
    pid, fd = pty.fork()
    if pid == 0:
        # the terminal's Ctrl-C must reach the script as a user's would: an ignored or blocked
        # SIGINT would pass from this test process through exec unchanged
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.execv(sys.executable, [sys.executable, "scripts/chat.py", str(real_model), "--cache", str(tmp_path),
                                  "--mode", "int8", "--memory-budget", "200MB", "--max-new-tokens", "200"])
    buf = b""

    def read_until(token: bytes, timeout: float = 120) -> bytes:
        nonlocal buf
        end = time.time() + timeout
        while token not in buf:
            if time.time() > end:
                status = Path(f"/proc/{pid}/status")
                sig = [x for x in status.read_text().splitlines() if x.startswith("Sig")] if status.exists() else []
                raise AssertionError(f"no {token!r} in {buf[-2000:]!r}; the script's signals: {sig}")
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    buf += os.read(fd, 4096)
                except OSError:
                    break
        return buf

    read_until(b"you> ")
    buf = b""
    os.write(fd, b"What is the capital of France?\n")
    read_until(b"bot> ")
    buf = buf.split(b"bot> ", 1)[1]
    read_until(b"you> ")
    assert b"Paris" in buf
    buf = b""
    os.write(fd, b"/stats\n")
    read_until(b"cached")
    read_until(b"you> ")
    buf = b""
    os.write(fd, b"Write a very long story about a dragon.\n")
    read_until(b"bot> ")
    buf = b""
    time.sleep(1.5)
    os.write(fd, b"\x03")  # Ctrl-C stops the answer, the session goes on
    read_until(b"[stopped]")
    buf = buf.split(b"[stopped]", 1)[1]
    read_until(b"you> ")
    os.write(fd, b"/reset\n")
    read_until(b"[history cleared]")
    os.write(fd, b"\x04")  # end of input exits cleanly
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_sliding_window_models_are_refused_by_the_paged_cache(tiny):
    tiny.load().config.sliding_window = 8  # as a sliding-window model's config says
    with pytest.raises(ValueError, match="sliding-window attention.*prefix_cache=False"):
        tiny.generate([5, 6, 7], max_new_tokens=2)
    assert len(tiny.generate([5, 6, 7], max_new_tokens=2, prefix_cache=False).token_ids) == 2
