"""A chat longer than the context keeps going: the system prompt stays, the oldest turns leave
the history until the prompt plus the answer fit, said once; a turn that fails leaves the
history as it was; a message that cannot fit even alone is a clear error with the numbers."""

from __future__ import annotations

import logging

import pytest

from conftest import make_tiny_model
from sli import QuantizationConfig, UniversalSLIProcessor

# the tiny models' word-level tokenizer has no chat template: one whose roles are words
TEMPLATE = ("{% for m in messages %}{{ {'system': 'word1', 'user': 'word2', 'assistant': 'word3'}[m['role']] }} "
            "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}word3{% endif %}")
SYSTEM = "word7 word8 word9 word10"


def _words(seed: int, n: int) -> str:
    return " ".join(f"word{20 + (seed * 13 + i * 7) % 250}" for i in range(n))


@pytest.fixture
def tiny_chat(tmp_path, tiny_root):
    path = make_tiny_model(tiny_root, "llama", layers=2, seed=23)
    p = UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode="none"), cache_dir=tmp_path / "c",
                              memory_budget=1 << 40, context_tokens=64, progress=False)
    p.load()
    p.tokenizer.chat_template = TEMPLATE
    prompts: list[list[int]] = []
    stream = p.stream

    def recording_stream(prompt, **kw):  # what each turn sends to the model
        prompts.append(list(prompt))
        return stream(prompt, **kw)

    p.stream = recording_stream
    yield p, prompts
    p.close()


def test_turns_past_the_context_drop_the_oldest_and_say_it_once(tiny_chat, caplog):
    p, prompts = tiny_chat
    chat = p.chat(system_prompt=SYSTEM)
    assert chat.context_tokens() == 64
    system_ids = p.tokenizer(f"word1 {SYSTEM}")["input_ids"]
    with caplog.at_level(logging.WARNING, logger="sli.chat"):
        for turn in range(8):
            r = chat.send(_words(turn, 9), max_new_tokens=8)
            sent = prompts[-1]
            assert len(r.token_ids) == 8 and len(sent) + 8 <= 64, (turn, len(sent))
            assert sent[: len(system_ids)] == system_ids  # the system prompt stays first
            assert [m["role"] for m in chat.messages] == ["user", "assistant"] * (len(chat.messages) // 2)
            assert chat.messages[-2]["content"] == _words(turn, 9)
            # the answer is what a fresh prefill of the same (shortened) prompt gives
            assert r.token_ids == p.generate(sent, max_new_tokens=8, ignore_eos=True, prefix_cache=False).token_ids
    assert chat.dropped_turns >= 3 and len(chat.messages) < 16
    said = [m for m in caplog.messages if "outgrew" in m]
    assert len(said) == 1 and "64 tokens of context" in said[0] and "system prompt stays" in said[0]


def test_whole_turns_leave_and_leading_system_messages_stay(tiny_chat):
    p, _ = tiny_chat
    history = [{"role": "system", "content": "word11 word12"}]
    for t in range(4):
        history += [{"role": "user", "content": _words(t, 5)}, {"role": "assistant", "content": _words(t + 50, 4)}]
    chat = p.chat(system_prompt=SYSTEM, messages=history)
    new = {"role": "user", "content": _words(9, 6)}
    kept, ids, dropped = chat.fit([*history, new], 8)
    assert kept[0] == history[0] and kept[-1] == new and dropped >= 1
    assert kept[1:-1] == history[1 + 2 * dropped :]  # whole user+assistant pairs, oldest first
    assert len(ids) + 8 <= 64 and len(chat._ids(kept[:1] + history[2 * dropped - 1 :] + [new])) + 8 > 64  # no more than needed


def test_a_failed_turn_leaves_the_history_as_it_was(tiny_chat):
    p, _ = tiny_chat
    chat = p.chat(system_prompt=SYSTEM)
    chat.send(_words(1, 6), max_new_tokens=4)
    before = [dict(m) for m in chat.messages]
    with pytest.raises(ValueError, match=r"the system prompt and this message take \d+ tokens; with max_new_tokens=8 "
                                         r"they need \d+ of the 64 tokens of context the budget reserves"):
        chat.send(_words(2, 70), max_new_tokens=8)
    assert chat.messages == before
    stream = p.stream

    def failing(prompt, **kw):  # the model fails half-way through an answer
        for i, piece in enumerate(stream(prompt, **kw)):
            if i == 2:
                raise RuntimeError("disk went away")
            yield piece

    p.stream = failing
    with pytest.raises(RuntimeError, match="disk went away"):
        chat.send(_words(3, 6), max_new_tokens=6)
    assert chat.messages == before
    p.stream = stream
    assert chat.send(_words(4, 6), max_new_tokens=4).text and len(chat.messages) == len(before) + 2


def test_an_answer_stopped_by_the_caller_keeps_the_part_said(tiny_chat):
    p, _ = tiny_chat
    chat = p.chat()
    gen = chat.stream(_words(5, 6), max_new_tokens=8)
    first = next(gen)
    gen.close()  # what the terminal chat does on Ctrl-C
    assert chat.messages == [{"role": "user", "content": _words(5, 6)}, {"role": "assistant", "content": first}]


@pytest.mark.real
def test_real_model_chat_at_64mb_keeps_going_past_its_context(real_model, tmp_path, caplog):
    """The issue's case: 64 MB and 347 tokens of context (what the default nf4 float32 plan reserves
    there; int4 in bf16 streams faster); the fourth turn used to fail, and every later one with it."""
    p = UniversalSLIProcessor(real_model, quantization_config="int4", dtype="bfloat16", cache_dir=tmp_path,
                              memory_budget="64MB", context_tokens=347, progress=False)
    chat = p.chat(system_prompt="You are a helpful assistant.")
    assert chat.context_tokens() == 336  # 21 blocks of 16 tokens
    questions = ["Tell me about the history of Paris in detail.", "And what about its museums?", "What food is it known for?",
                 "Which river flows through it?", "Name one famous bridge there."]
    with caplog.at_level(logging.WARNING, logger="sli.chat"):
        for q in questions:
            r = chat.send(q, max_new_tokens=64)
            assert r.text and r.stats.prompt_tokens + 64 <= chat.context_tokens()
            assert chat.messages[-2]["content"] == q
    assert chat.dropped_turns >= 1 and len([m for m in caplog.messages if "outgrew" in m]) == 1
    p.close()


@pytest.mark.real
def test_sli_chat_in_a_small_context_answers_every_turn(real_model, tmp_path):
    """`sli chat` as a user runs it, fed from a pipe: every turn answered, said once, exits 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    turns = ["What is the capital of France?", "And of Italy?", "And of Spain?", "And of Germany?", "And of Portugal?"]
    r = subprocess.run(
        [sys.executable, "scripts/chat.py", str(real_model), "--cache", str(tmp_path), "--mode", "int4", "--dtype", "bfloat16",
         "--context-tokens", "128", "--max-new-tokens", "32", "--system", "Answer in a few words."],
        input="\n".join(turns) + "\n/exit\n", capture_output=True, text=True, timeout=900, cwd=root,
        env=dict(os.environ, PYTHONPATH=str(root)),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    answers = [a for a in r.stdout.split("bot> ")[1:]]
    assert len(answers) == len(turns) and all(a.strip() and "[error" not in a for a in answers), r.stdout[-3000:]
    assert r.stderr.count("outgrew") == 1, r.stderr[-3000:]
