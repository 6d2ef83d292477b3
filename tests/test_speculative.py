"""Speculative decoding: the drafts, the pass-cost model, KV rollback, and exactness (greedy
tokens equal plain decoding; sampled tokens follow plain sampling's distribution)."""

from dataclasses import replace

import pytest
import torch

from conftest import make_tiny_model
from runtime.generate import GenerationOutput, SamplingConfig, generate, stream
from runtime.kv import BlockPool, PagedKVCache, PrefixCachingSession, Sequence, prefix_session_for
from runtime.speculative import (DraftLength, ModelDrafter, PassCost, PromptLookup, SpeculativeConfig, accept_greedy,
                                 accept_sampled)
from sli import QuantizationConfig, UniversalSLIProcessor


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df): the regularized upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def chi2_p(counts: dict, probs: dict) -> float:
    """Goodness of fit of observed ``counts`` to ``probs`` (which cover every outcome); categories
    expected fewer than 5 times are pooled, and a pool still that small joins the smallest other."""
    n = sum(counts.values())
    if set(counts) - set(probs):
        return 0.0  # an outcome the model cannot produce
    big = sorted((c for c in probs if probs[c] * n >= 5), key=probs.get)
    small = [c for c in probs if c not in big]
    obs = [counts.get(c, 0) for c in big]
    exp = [probs[c] * n for c in big]
    if small:
        o, e = sum(counts.get(c, 0) for c in small), sum(probs[c] for c in small) * n
        if e >= 5:
            obs.append(o), exp.append(e)
        else:
            obs[0], exp[0] = obs[0] + o, exp[0] + e
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return chi2_sf(stat, len(exp) - 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run thousands of small passes here: one thread each, not a team spinning on a shared host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    path = make_tiny_model(root, "llama", layers=3, seed=17)
    p = UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode="none"), cache_dir=root / "c",
                              memory_budget=1 << 40, context_tokens=256, progress=False)
    p.load()
    yield p
    p.close()


def _prompts(n: int = 8) -> list[torch.Tensor]:
    """Random prompts and repetitive ones (where prompt lookup hits often)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        ids = torch.randint(4, 300, (1, 10 + 3 * i), generator=g)
        if i % 2:
            ids = torch.cat([ids[:, :5 + i]] * 4, dim=1)
        out.append(ids)
    return out


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    look = PromptLookup(min_ngram=1, max_ngram=3)
    text = [1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3]
    assert look.propose(text, 3) == [5, 6, 2]  # "2 3" last followed by 5; the 3-gram "6 2 3" never occurred
    assert look.propose(text + [5], 2) == [6, 2]  # the index grows with the text: "2 3 5" now matches
    assert look.propose([7, 8], 4) == []  # another text: indexed afresh, and nothing matches
    assert look.propose([7, 8, 7], 4) == [8, 7]  # what is proposed may run into the text's own end
    assert look.propose([7, 8, 7], 0) == []


def test_pass_cost_fit_and_draft_length_follow_measurements():
    cost = PassCost()
    cost.add(1, 0.6)
    assert cost.fit() is None  # one row count says nothing about the slope
    for rows in (1, 2, 5, 9):
        cost.add(rows, 0.5 + 0.1 * rows)
    a, b = cost.fit()
    assert abs(b - 0.1) < 0.02 and abs(a - 0.5) < 0.1

    cfg = SpeculativeConfig(max_draft=8, initial_draft=3, probe_every=4)
    flat = DraftLength(cfg)
    assert flat.next() == 3  # cost not measured yet
    for _ in range(6):  # disk-bound passes: rows nearly free; every drafted token kept
        flat.observe(drafted=4, kept=4, rows=5, seconds=1.02)
        flat.observe(drafted=0, kept=0, rows=1, seconds=1.0)
    assert flat.next() == 8

    steep = DraftLength(cfg)
    for _ in range(6):  # compute-bound passes (cost grows with rows) and drafts that miss
        steep.observe(drafted=2, kept=0, rows=3, seconds=3.0)
        steep.observe(drafted=0, kept=0, rows=1, seconds=1.0)
    assert [steep.next() for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]  # plain decoding, probing every 4th pass

    assert SpeculativeConfig(adaptive=False, max_draft=5).max_draft == 5 and DraftLength(SpeculativeConfig(adaptive=False, max_draft=5)).next() == 5
    with pytest.raises(ValueError, match="max_draft must be >= 1"):
        SpeculativeConfig(max_draft=0)
    with pytest.raises(ValueError, match="speculative must be None, 'lookup', 'draft'; got 'tree'"):
        SpeculativeConfig.create("tree")


def test_greedy_and_sampled_acceptance_rules():
    scores = torch.tensor([[0.0, 5, 1], [3, 0, 1], [0, 0, 9]])
    assert accept_greedy(scores, [1, 0]) == (2, 2)  # both kept, the model's own token follows
    assert accept_greedy(scores, [1, 2]) == (1, 0)  # the second disagrees: the model's token replaces it
    assert accept_greedy(scores, [0, 0]) == (0, 1)
    assert accept_greedy(scores[:1], []) == (0, 1)  # nothing drafted: plain decoding
    # a drafted token of probability 1 is always kept; of probability 0 never, and never drawn again
    certain = torch.tensor([[0.0, 1, 0], [0.2, 0.3, 0.5]])
    assert accept_sampled(certain, [1], torch.Generator().manual_seed(0))[0] == 1
    g = torch.Generator().manual_seed(0)
    never = torch.tensor([[0.5, 0.5, 0], [1, 0, 0]])
    assert {accept_sampled(never, [2], g) for _ in range(50)} == {(0, 0), (0, 1)}


def _rule_counts(rule, probs, draft, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = {}
    for _ in range(n):
        kept, nxt = rule(probs, draft, g)
        key = tuple(draft[:kept]) + (nxt,)
        counts[key[:2]] = counts.get(key[:2], 0) + 1
    return counts


def _wrong_rule(probs, draft, gen):
    """A classic mistake: on rejection, draw from p without removing the drafted token."""
    x = draft[0]
    if torch.rand((), generator=gen).item() < probs[0, x].item():
        return 1, int(torch.multinomial(probs[1], 1, generator=gen))
    return 0, int(torch.multinomial(probs[0], 1, generator=gen))


def test_rejection_rule_gives_the_model_distribution_and_the_test_sees_a_wrong_rule():
    """The first two tokens of a pass (a drafted 1, then the model's next) against the exact joint
    ``p0(t1) * p1(t2 | t1)``; here p1 only matters after the drafted token, so the second token
    is counted only there. A rule that forgets to remove the rejected token fails the same test."""
    p0 = torch.tensor([0.3, 0.45, 0.25])
    p1 = torch.tensor([0.6, 0.1, 0.3])
    probs = torch.stack([p0, p1])
    exact = {(1, t): float(p0[1] * p1[t]) for t in range(3)} | {(0,): float(p0[0]), (2,): float(p0[2])}
    good = _rule_counts(accept_sampled, probs, [1], 4000)
    assert chi2_p(good, exact) > 1e-3
    bad = _rule_counts(_wrong_rule, probs, [1], 4000)
    assert chi2_p(bad, exact) < 1e-6


def test_greedy_tokens_equal_plain_decoding(tiny):
    m = tiny.model
    cfg = SamplingConfig(max_new_tokens=32)
    eager = SpeculativeConfig(adaptive=False, max_draft=4)  # draft wherever lookup finds something
    tpp = []
    for i, ids in enumerate(_prompts(6)):
        want = generate(m, ids, cfg).token_ids
        for spec in ("lookup", eager) if i < 2 else (eager,):
            got = generate(m, ids, cfg, speculative=spec)
            assert got.token_ids == want
            tpp.append(got.stats.tokens_per_pass)
    assert max(tpp) > 1.5  # some passes kept several tokens
    penalized = SamplingConfig(max_new_tokens=30, repetition_penalty=1.3)  # each verified row sees its own context
    ids = _prompts()[1]
    assert generate(m, ids, penalized, speculative=eager).token_ids == generate(m, ids, penalized).token_ids


def test_paged_kv_keeps_exactly_the_accepted_tokens(tiny):
    """Against plain decoding on its own pool: the same blocks filed under the same hashes with
    the same KV, and every block back in the free queue (rejected tokens' blocks released)."""
    m = tiny.model
    cfg = SamplingConfig(max_new_tokens=45)
    for ids in _prompts(4):
        plain, spec = prefix_session_for(m), prefix_session_for(m)
        want = generate(m, ids, cfg, prefix_cache=plain)
        got = generate(m, ids, cfg, prefix_cache=spec, speculative=SpeculativeConfig(adaptive=False, max_draft=6))
        assert got.token_ids == want.token_ids
        assert got.stats.drafted_tokens > 0 and got.stats.acceptance < 1  # drafts were made and some rejected
        assert set(spec.pool.by_hash) == set(plain.pool.by_hash) and plain.pool.by_hash
        for h, i in plain.pool.by_hash.items():
            assert (spec.pool.block(spec.pool.by_hash[h]) - plain.pool.block(i)).abs().max() < 1e-4
        assert len(spec.pool.free) == spec.pool.num_blocks and not any(b.ref_count for b in spec.pool.blocks)
        longer = torch.tensor([ids[0].tolist() + want.token_ids[:30]])  # a next turn: the filed blocks are reused
        again = generate(m, longer, cfg, prefix_cache=spec, speculative="lookup")
        assert again.stats.cached_tokens >= 32 and again.token_ids == generate(m, longer, cfg).token_ids


def test_truncate_releases_blocks_and_refuses_the_shared_prefix():
    pool = BlockPool(6, num_layers=2, kv_heads=1, head_dim=2, block_size=4)
    session = PrefixCachingSession(pool, salt="t", num_layers=2)
    cache = PagedKVCache(pool, Sequence(), 2)
    for layer in cache.layers:
        layer.update(torch.randn(1, 1, 10, 2), torch.randn(1, 1, 10, 2))
    assert len(cache.seq.blocks) == 3 and len(pool.free) == 3
    third = cache.seq.blocks[2]
    cache.truncate(5)
    assert cache.get_seq_length() == 5 and len(cache.seq.blocks) == 2 and third.ref_count == 0 and third.hash is None
    with pytest.raises(ValueError, match="cannot truncate a cache of 5 tokens to 6"):
        cache.truncate(6)
    for layer in cache.layers:  # the next tokens write over the rejected ones' slots
        layer.update(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    k, _ = cache.gather(0, 8)
    assert (k[0, 0, 5:8] == 1).all()
    session.finish(cache, list(range(8)))
    reused, cached, _ = session.start(list(range(8)) + [99])
    assert cached == 8
    with pytest.raises(ValueError, match="between the 8 reused prefix tokens"):
        reused.truncate(7)


def test_sampling_is_seeded_and_follows_plain_sampling(tiny):
    """The model's exact joint distribution of the first three tokens (at top_k=2: 8 outcomes)
    against speculative sampling over seeded runs; the draft proposes the likelier 2nd token
    (kept about as often as the model gives it, rejected otherwise)."""
    m = tiny.model
    ids = _prompts()[1][:, :12]
    cfg = SamplingConfig(max_new_tokens=3, do_sample=True, temperature=1.5, top_k=2)

    def probs(seq):
        top = m.logits(torch.tensor([seq]))[0, -1].topk(2)
        return dict(zip(top.indices.tolist(), torch.softmax(top.values / 1.5, -1).tolist()))

    base = ids[0].tolist()
    exact, likely = {}, {}
    for t1, q1 in probs(base).items():
        p2 = probs(base + [t1])
        likely[t1] = max(p2, key=p2.get)
        for t2, q2 in p2.items():
            for t3, q3 in probs(base + [t1, t2]).items():
                exact[(t1, t2, t3)] = q1 * q2 * q3

    class Guess:
        def propose(self, tokens, k):
            return [likely[tokens[len(base)]]][:k] if len(tokens) == len(base) + 1 else []

    counts = {}
    for seed in range(800):
        out = generate(m, ids, replace(cfg, seed=seed), speculative="draft", draft=Guess())
        counts[tuple(out.token_ids)] = counts.get(tuple(out.token_ids), 0) + 1
    assert out.stats.drafted_tokens == 1
    assert chi2_p(counts, exact) > 1e-3
    a = generate(m, ids, SamplingConfig(max_new_tokens=20, do_sample=True, seed=7), speculative="lookup")
    b = generate(m, ids, SamplingConfig(max_new_tokens=20, do_sample=True, seed=7), speculative="lookup")
    c = generate(m, ids, SamplingConfig(max_new_tokens=20, do_sample=True, seed=8), speculative="lookup")
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_draft_model_gives_the_same_greedy_tokens(tiny, tmp_path):
    m = tiny.model
    other = UniversalSLIProcessor(make_tiny_model(tmp_path, "llama", layers=2, seed=5), quantization_config="none",
                                  cache_dir=tmp_path / "c", memory_budget=1 << 40, context_tokens=256, progress=False)
    cfg = SamplingConfig(max_new_tokens=30)
    for ids in _prompts(3):
        want = generate(m, ids, cfg).token_ids
        same = generate(m, ids, cfg, speculative="draft", draft=m)  # the model drafting for itself: all kept
        assert same.token_ids == want and same.stats.acceptance == 1.0
        assert generate(m, ids, cfg, speculative="draft", draft=other.load()).token_ids == want
    other.close()


def test_bad_requests_are_refused(tiny):
    m = tiny.model
    ids = torch.randint(4, 300, (2, 8))
    with pytest.raises(ValueError, match="serves one sequence .*batch of 2.*speculative=None"):
        generate(m, ids, SamplingConfig(max_new_tokens=4), speculative="lookup")
    with pytest.raises(ValueError, match="speculative='draft' needs draft="):
        generate(m, ids[:1], SamplingConfig(max_new_tokens=4), speculative="draft")
    out = GenerationOutput()
    steps = list(stream(m, ids[:1], SamplingConfig(max_new_tokens=5), out, speculative="lookup"))
    assert [s.index for s in steps] == list(range(5)) and out.stats.stop_reason == "length"
    assert ModelDrafter(m).propose([5, 6, 7], 0) == []


def test_processor_and_cli_speculate(tiny, tmp_path, capsys):
    prompt = " ".join(f"word{5 + i % 7}" for i in range(30))  # repetitive: lookup drafts often
    plain = tiny.generate(prompt, max_new_tokens=24, ignore_eos=True)
    spec = tiny.generate(prompt, max_new_tokens=24, ignore_eos=True, speculative="lookup")
    assert spec.token_ids == plain.token_ids and spec.text == plain.text and spec.stats.drafted_tokens > 0
    assert plain.stats.tokens_per_pass == 1.0 and plain.stats.drafted_tokens == 0
    own = tiny.generate(prompt, max_new_tokens=24, ignore_eos=True, speculative="draft", draft="int8")  # its own int8 variant
    assert own.token_ids == plain.token_ids and own.stats.acceptance > 0.5
    with pytest.raises(ValueError, match="speculative='draft' needs draft="):
        tiny.generate(prompt, speculative="draft")
    with pytest.raises(ValueError, match="serves one prompt; 2 prompts decode as a batch"):
        tiny.generate([prompt, prompt], speculative="lookup")
    other = make_tiny_model(tmp_path, "llama", layers=2, seed=5, vocab=400)
    with pytest.raises(ValueError, match=r"another tokenizer \(400 tokens; 0 of the model's 320"):
        tiny.generate(prompt, speculative="draft", draft=str(other))

    from sli.cli import main

    assert main(["generate", str(tiny.model_path), "--mode", "none", "--cache", str(tiny.cache_dir), "--prompt", prompt,
                 "--max-new-tokens", "12", "--speculative", "lookup"]) == 0
    err = capsys.readouterr().err
    assert "tokens per pass" in err, err[-400:]


REAL_PROMPTS = [
    "Repeat this sentence exactly, twice: The quick brown fox jumps over the lazy dog near the river bank.",
    "Fix the bug in this function and return the whole function:\n\ndef mean(xs):\n    total = 0\n    for x in xs:\n"
    "        total += x\n    return total / len(x)\n",
    "What are three good habits for learning a new programming language?",
    "Summarize in one sentence: The library opens at nine. It closes at five on weekdays and at noon on Saturdays. "
    "It is closed on Sundays.",
]


@pytest.mark.real
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_model_greedy_tokens_equal_plain_decoding(real_model, tmp_path, dtype):
    """fp32: every token equal. bf16: a pass of several rows may round differently from a pass of
    one, so a near-tie between the two best tokens may flip; every divergence must be such a tie
    (top-two gap of the plain run's logits under a few bf16 steps at that magnitude)."""
    p = UniversalSLIProcessor(real_model, quantization_config="none", cache_dir=tmp_path, dtype=dtype, progress=False)
    m = p.load()
    tok = p.tokenizer
    diverged, kept = [], 0
    for text in REAL_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        want = p.generate(ids, max_new_tokens=32, prefix_cache=False)
        got = p.generate(ids, max_new_tokens=32, speculative="lookup")  # through the paged prefix cache
        kept += got.stats.drafted_tokens * got.stats.acceptance
        if got.token_ids != want.token_ids:
            i = next(j for j, (a, b) in enumerate(zip(got.token_ids, want.token_ids)) if a != b)
            top = m.logits(torch.tensor([ids + want.token_ids[:i]]))[0, -1].topk(2).values
            diverged.append((text[:20], i, float(top[0] - top[1])))
    assert kept > 10  # lookup did draft and the model kept drafted tokens
    if dtype == "float32":
        assert diverged == []
    else:
        assert all(gap < 0.25 for _, _, gap in diverged), diverged
    p.close()


def test_a_plan_name_drafts_with_the_models_own_variant_built_into_the_same_cache(tmp_path):
    """draft="int4": the model's own 4-bit variant, quantized into the cache the model is
    reading (one process reads one variant and writes another), gives plain greedy's tokens."""
    from cache.store import LayerStore

    path = make_tiny_model(tmp_path, "llama", layers=3, seed=21)
    p = UniversalSLIProcessor(str(path), quantization_config=QuantizationConfig(mode="none"), cache_dir=str(tmp_path / "c"),
                              dtype="float32", progress=False)
    prompt = "word5 word9 word13 word5 word9 word13 word5"
    plain = p.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
    spec = p.generate(prompt, max_new_tokens=12, ignore_eos=True, speculative="draft", draft="int4")
    assert spec.token_ids == plain and spec.stats.decode_passes > 0
    with LayerStore(tmp_path / "c", readonly=True) as st:
        assert len(st.list_variants()) == 2  # the draft's variant went into the model's own cache
    p.close()
