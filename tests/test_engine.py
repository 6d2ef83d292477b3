"""The continuous-batching engine: the batched paged step against transformers, the scheduler
step by step, greedy tokens against `stream()` alone, prefix sharing, preemption, cancelling,
failures that stay with their request, and the one validation every entry point uses."""

import queue
import subprocess
import sys

import pytest
import torch

from conftest import TINY_TYPES, make_tiny_model
from runtime.engine import EngineConfig, EngineRequest, QueueFullError
from runtime.generate import ContextLengthError, InvalidRequestError, SamplingConfig, check_stop
from runtime.kv import BlockPool, PrefixCachingSession, pool_for
from runtime.kvbatch import SeqSlice, forward_step, step_layout
from runtime.scheduler import Scheduler, SeqState
from sli import QuantizationConfig, UniversalSLIProcessor


def _proc(path, cache, **kw):
    kw = {"memory_budget": 1 << 40, "context_tokens": 256, **kw}
    return UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode="none"), cache_dir=cache, progress=False, **kw)


@pytest.fixture()
def tiny(tmp_path, tiny_root):
    p = _proc(make_tiny_model(tiny_root, "llama", layers=3, seed=5), tmp_path / "c")
    yield p
    p.close()


def _prompts(n, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 300, (k,), generator=g).tolist() for k in lengths[:n]]


def _run(core, reqs):
    """Step the core until every request has finished; returns each one's outputs."""
    outs = {r.request_id: [] for r in reqs}
    for r in reqs:
        core.add(r, outs[r.request_id].append)
    for _ in range(2000):
        if not core.has_work:
            break
        core.step()
    assert not core.has_work
    return [outs[r.request_id] for r in reqs]


def _tokens(outs):
    return [t for o in outs for t in o.token_ids]


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_a_batched_step_equals_transformers(tmp_path, tiny_root, model_type):
    """Prefill chunks of three sequences, then a decode step of all three, in single forward
    passes over the paged pool: fp32 logits equal transformers' in-memory model (< 1e-4)."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tiny_root, model_type, layers=3)
    p = _proc(path, tmp_path / "c")
    m = p.load()
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    pool = pool_for(m)
    seqs = [torch.tensor(s) for s in _prompts(3, [5, 23, 40])]
    done, blocks = [0, 0, 0], [[], [], []]
    worst = 0.0
    for chunk in [(5, 17, 33), (0, 6, 7), (1, 1, 1)]:
        parts, ids, feed = [], [], []
        for i, n in enumerate(chunk):
            if n == 0:
                continue
            if done[i] + n > len(seqs[i]):  # the decode step: one new token each
                seqs[i] = torch.cat([seqs[i], torch.tensor([7 + i])])
            while len(blocks[i]) * 16 < done[i] + n:
                blocks[i].append(pool.allocate())
            parts.append(SeqSlice(blocks[i], done[i], n))
            ids.append(seqs[i][done[i] : done[i] + n])
            feed.append(i)
        layout = step_layout(pool, parts, m.dtype)
        got = forward_step(m, pool, layout, torch.cat(ids), torch.arange(layout.num_tokens))
        t = 0
        for i, x in zip(feed, ids):
            n = len(x)
            with torch.no_grad():
                want = ref(seqs[i][None, : done[i] + n]).logits[0, done[i] :]
            worst = max(worst, (got[t : t + n] - want).abs().max().item())
            t, done[i] = t + n, done[i] + n
    assert worst < 1e-4
    p.close()


def test_step_layout_masks_other_sequences_and_block_tails():
    pool = BlockPool(4, num_layers=1, kv_heads=1, head_dim=2, block_size=4)
    a, b = [pool.allocate()], [pool.allocate(), pool.allocate()]
    lay = step_layout(pool, [SeqSlice(a, 2, 1), SeqSlice(b, 3, 2)], torch.float32)
    assert lay.slots.tolist() == [a[0].index * 4 + 2, b[0].index * 4 + 3, b[1].index * 4 + 0]
    assert lay.position_ids.tolist() == [[2, 3, 4]] and lay.last.tolist() == [0, 2]
    seen = (lay.mask[0, 0] == 0).int().tolist()  # keys: a's 4 slots, then b's 8
    assert seen[0] == [1, 1, 1, 0] + [0] * 8  # a's token at position 2: a's first three slots only
    assert seen[1] == [0] * 4 + [1, 1, 1, 1] + [0] * 4
    assert seen[2] == [0] * 4 + [1, 1, 1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="holds 1 blocks; its 6 tokens need 2"):
        step_layout(pool, [SeqSlice(a, 4, 2)], torch.float32)


def test_scheduler_decodes_first_chunks_prompts_and_preempts_the_latest():
    pool = BlockPool(6, num_layers=1, kv_heads=1, head_dim=2, block_size=4)
    s = Scheduler(PrefixCachingSession(pool, salt="m", num_layers=1), max_running=8, step_tokens=6)
    a, b = SeqState("a", list(range(10)), 10, 4), SeqState("b", list(range(20, 27)), 7, 4)
    s.add(a)
    s.add(b)
    w = s.schedule()
    assert [(x.seq.request_id, x.start, x.n) for x in w] == [("a", 0, 6)]  # a's first chunk fills the step
    s.advance(w)
    w = s.schedule()
    assert [(x.seq.request_id, x.n) for x in w] == [("a", 4), ("b", 2)]  # a's rest, then b joins
    s.advance(w)
    a.tokens.append(99)  # a's first new token
    w = s.schedule()
    assert [(x.seq.request_id, x.n) for x in w] == [("a", 1), ("b", 5)]  # a decodes, b finishes its prompt
    assert a.registered == 2 and pool.blocks[a.blocks[0].index].hash is not None  # full blocks filed as they fill
    s.advance(w)
    # a holds 3 blocks, b 2, one is free; a's 13th token and b's 9th each need one more
    b.tokens += [98, 97]
    b.computed = len(b.tokens) - 1
    a.tokens += [97, 96]
    a.computed = len(a.tokens) - 1
    w = s.schedule()  # a (admitted first) gets the last block; b, the latest admitted, is preempted
    assert s.preemptions == 1 and list(s.waiting) == [b] and b.blocks == [] and b.computed == 0
    assert [(x.seq.request_id, x.n) for x in w] == [("a", 1)]


def test_engine_greedy_equals_stream_alone_while_requests_join_and_leave(tiny):
    prompts = _prompts(6, [5, 23, 40, 17, 33, 9], seed=1)
    lengths = [12, 3, 9, 1, 7, 12]
    alone = [tiny.generate(p, max_new_tokens=n, ignore_eos=True, prefix_cache=False).token_ids for p, n in zip(prompts, lengths)]
    eng = tiny.engine(EngineConfig(step_tokens=16))
    core = eng.core
    outs = {}
    order = list(zip(range(6), prompts, lengths))
    # two join now, the rest one every step: prefills ride along with running decodes
    for i, p, n in order[:2]:
        r = EngineRequest(tuple(p), SamplingConfig(max_new_tokens=n))
        outs[i] = []
        core.add(r, outs[i].append)
    pending = order[2:]
    while core.has_work or pending:
        if pending:
            i, p, n = pending.pop(0)
            outs[i] = []
            core.add(EngineRequest(tuple(p), SamplingConfig(max_new_tokens=n)), outs[i].append)
        core.step()
    assert [_tokens(outs[i]) for i in range(6)] == alone
    assert core.stats.max_batch >= 3 and all(outs[i][-1].finish_reason == "length" for i in range(6))
    assert len(core.pool.free) == core.pool.num_blocks  # every block back in the free queue


def test_a_shared_prefix_is_prefilled_once(tiny):
    system = _prompts(1, [48], seed=2)[0]
    prompts = [system + q for q in _prompts(4, [5, 6, 7, 8], seed=3)]
    alone = [tiny.generate(p, max_new_tokens=4, ignore_eos=True, prefix_cache=False).token_ids for p in prompts]
    core = tiny.engine().core
    reqs = [EngineRequest(tuple(p), SamplingConfig(max_new_tokens=4)) for p in prompts]
    outs = _run(core, reqs)
    assert [_tokens(o) for o in outs] == alone
    # the first request computes the 48 shared tokens; the others wait a step for its blocks and reuse them
    assert [o[-1].cached_tokens for o in outs] == [0, 48, 48, 48]
    assert core.stats.prefill_tokens == 48 + 5 + 6 + 7 + 8


def test_a_full_pool_preempts_and_every_request_still_matches(tmp_path, tiny_root):
    p = _proc(make_tiny_model(tiny_root, "llama", layers=3, seed=5), tmp_path / "c", context_tokens=96)
    prompts = _prompts(5, [20, 30, 25, 18, 27], seed=4)
    alone = [p.generate(x, max_new_tokens=24, ignore_eos=True, prefix_cache=False).token_ids for x in prompts]
    core = p.engine().core
    assert core.pool.num_blocks == 6  # 96 tokens: far less than the 5 x ~50 the requests need together
    outs = _run(core, [EngineRequest(tuple(x), SamplingConfig(max_new_tokens=24)) for x in prompts])
    assert [_tokens(o) for o in outs] == alone
    assert core.sched.preemptions > 0
    p.close()


def test_cancel_frees_the_blocks_at_the_next_step(tiny):
    core = tiny.engine().core
    outs = []
    r = EngineRequest(tuple(_prompts(1, [40])[0]), SamplingConfig(max_new_tokens=50))
    core.add(r, outs.append)
    for _ in range(3):
        core.step()
    assert core.num_running == 1 and len(core.pool.free) < core.pool.num_blocks
    core.abort(r.request_id)
    assert outs[-1].finish_reason == "abort" and not core.has_work
    assert len(core.pool.free) == core.pool.num_blocks


def test_a_failing_step_ends_its_requests_and_the_engine_goes_on(tiny, monkeypatch):
    import runtime.engine as engine_mod

    eng = tiny.engine().start()
    real = engine_mod.forward_step
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return real(*a, **kw)

    monkeypatch.setattr(engine_mod, "forward_step", flaky)
    q1, q2 = queue.Queue(), queue.Queue()
    eng.submit(EngineRequest((5, 6, 7), SamplingConfig(max_new_tokens=3)), q1.put)
    o = q1.get(timeout=60)
    assert o.finish_reason == "error" and "injected failure" in o.error
    eng.submit(EngineRequest((5, 6, 7), SamplingConfig(max_new_tokens=3)), q2.put)
    got = []
    while not got or not got[-1].finished:
        got.append(q2.get(timeout=60))
    assert got[-1].finish_reason == "length" and len(_tokens(got)) == 3
    # a bad request is refused before it reaches the loop
    with pytest.raises(InvalidRequestError, match="token id 100000 is outside the vocabulary"):
        eng.submit(EngineRequest((5, 100000), SamplingConfig(max_new_tokens=3)), q2.put)
    with pytest.raises(ContextLengthError, match="exceeds the model's context of 256"):
        eng.submit(EngineRequest((5,) * 250, SamplingConfig(max_new_tokens=10)), q2.put)
    assert eng.shutdown(timeout_s=5)


def test_the_waiting_queue_is_bounded(tiny):
    eng = tiny.engine(EngineConfig(max_waiting=2))  # not started: nothing leaves the queue
    for _ in range(2):
        eng.submit(EngineRequest((5, 6), SamplingConfig(max_new_tokens=2)), lambda o: None)
    with pytest.raises(QueueFullError, match="2 requests are waiting") as e:
        eng.submit(EngineRequest((5, 6), SamplingConfig(max_new_tokens=2)), lambda o: None)
    assert e.value.retry_after_s >= 1


def test_prompt_logprobs_equal_the_reference(tiny):
    prompt = _prompts(1, [37], seed=6)[0]
    core = tiny.engine(EngineConfig(step_tokens=16)).core  # prompt logits over three chunks
    (outs,) = _run(core, [EngineRequest(tuple(prompt), SamplingConfig(max_new_tokens=2), logprobs=2, prompt_logprobs=3)])
    plp = outs[0].prompt_logprobs
    want = torch.log_softmax(tiny.model.logits(torch.tensor([prompt]))[0], dim=-1)
    assert plp[0] is None and len(plp) == len(prompt)
    for i in range(1, len(prompt)):
        assert plp[i].token_id == prompt[i] and abs(plp[i].logprob - want[i - 1, prompt[i]].item()) < 1e-4
        assert [t for t, _ in plp[i].top] == torch.topk(want[i - 1], 3).indices.tolist()
    first = outs[0].logprobs[0]
    assert first.token_id == outs[0].token_ids[0] == int(want[-1].argmax())
    # echo only (max_tokens 0): the prompt's logprobs and nothing generated
    (outs,) = _run(core, [EngineRequest(tuple(prompt), SamplingConfig(max_new_tokens=0), prompt_logprobs=0)])
    assert outs[-1].finish_reason == "length" and _tokens(outs) == [] and len(outs[0].prompt_logprobs) == len(prompt)


# -- one validation for every entry point ------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), r"temperature must be >= 0 \(0 = greedy\), got -1"),
    (dict(do_sample=True, temperature=0), "temperature must be > 0 when sampling"),
    (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(seed=True), "seed must be an integer"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*63\)"),
])
def test_sampling_checks(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingConfig(**{"max_new_tokens": 4, **kwargs})


def test_stop_checks_and_openai_temperature():
    assert check_stop(None) == () and check_stop("x") == ("x",) and check_stop(["a", "b"]) == ("a", "b")
    with pytest.raises(InvalidRequestError, match="stop strings must not be empty"):
        check_stop(["a", ""])
    with pytest.raises(InvalidRequestError, match="stop must be a string or a list of strings"):
        check_stop([1])
    assert not SamplingConfig.create(max_new_tokens=3, temperature=0).do_sample
    assert SamplingConfig.create(max_new_tokens=3, temperature=0.7).do_sample
    with pytest.raises(InvalidRequestError, match="temperature must be >= 0"):
        SamplingConfig.create(max_new_tokens=3, temperature=-0.5)


def test_the_processor_and_the_cli_use_the_same_checks(tiny, tmp_path, tiny_root):
    with pytest.raises(InvalidRequestError, match="top_p must be in"):
        tiny.generate([5, 6], top_p=0)
    with pytest.raises(InvalidRequestError, match="temperature must be >= 0"):
        tiny.generate([5, 6], temperature=-1)  # greedy, but a negative temperature is still refused
    with pytest.raises(InvalidRequestError, match="stop strings must not be empty"):
        tiny.generate([5, 6], stop=[""])
    path = make_tiny_model(tiny_root, "llama", layers=3, seed=5)
    cp = subprocess.run([sys.executable, "-m", "sli.cli", "generate", str(path), "--mode", "none", "--cache", str(tmp_path / "cli"),
                         "--prompt", "word5 word6", "--temperature", "-1"], capture_output=True, text=True, timeout=300)
    assert cp.returncode == 2 and "temperature must be >= 0 (0 = greedy), got -1.0" in cp.stderr
    assert not (tmp_path / "cli").exists()  # refused before anything was quantized


def test_step_cost_fits_the_step_time_and_caps_steps_with_decoding_sequences():
    from runtime.engine import StepCost

    c = StepCost(decay=1.0)
    assert c.fit() is None
    for t in (1, 4, 16, 64, 16):
        c.add(t, 2.0 + 0.1 * t)
    a, b = c.fit()
    assert a == pytest.approx(2.0) and b == pytest.approx(0.1)
    assert c.tokens_within(2.0) == 22  # 2 + 0.1 * 22 <= 2 * (2 + 0.1)
    pool = BlockPool(16, num_layers=1, kv_heads=1, head_dim=2, block_size=4)
    s = Scheduler(PrefixCachingSession(pool, salt="m", num_layers=1), max_running=8, step_tokens=32)
    d = SeqState("d", list(range(4)), 4, 8)
    s.add(d)
    s.advance(s.schedule())  # d's prompt
    d.tokens.append(9)  # its first new token: d decodes from now on
    s.add(SeqState("p", list(range(40, 70)), 30, 4))
    w = s.schedule(cap=8)
    assert [(x.seq.request_id, x.n) for x in w] == [("d", 1), ("p", 7)]  # the cap holds while d decodes
    s.advance(w)
    d.tokens.append(10)
    w = s.schedule(cap=3)
    assert [(x.seq.request_id, x.n) for x in w] == [("d", 1), ("p", 4)]  # however tight, a prompt gets a few tokens
