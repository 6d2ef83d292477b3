"""`sli serve` as users use it: a real server process on loopback, the official `openai` client
(streaming and not), OpenAI's error bodies and statuses, cancelling on disconnect, SIGTERM,
and a bounded load test whose greedy outputs equal the prompts run alone, inside the budget."""

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import make_tiny_model

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency: pip install -e '.[dev]'")

from serverutil import KEY, Server, anon_bytes as _anon_bytes  # noqa: E402 (needs openai)

# -- a tiny model's server: errors, limits, lifecycle ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-tiny")
    return make_tiny_model(root, "llama", layers=3, seed=11), root / "cache"


@pytest.fixture(scope="module")
def tiny_server(tiny_model):
    path, cache = tiny_model
    s = Server([str(path), "--mode", "none", "--cache", str(cache), "--context-tokens", "256", "--max-running", "2",
                "--max-waiting", "1", "--api-key", KEY, "--served-model-name", "tiny"])
    yield s
    assert s.stop() == 0


def _long_stream(server, n=150, key=KEY):
    return server.client(key).completions.create(model="tiny", prompt="word5 word6 word7", max_tokens=n, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, extra_body={"ignore_eos": True})


def _idle(server) -> dict:
    """/health once nothing runs (what earlier tests cancelled has left)."""
    deadline = time.monotonic() + 30
    while (h := server.get("/health"))["running"] or h["waiting"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.02)
    return h


def test_errors_are_openai_errors_and_never_stop_the_engine(tiny_server):
    s = tiny_server
    stream = _long_stream(s)  # runs through all the bad requests below
    first = next(iter(stream))
    cases = [
        ({"model": "tiny", "prompt": "word5", "temperature": -1}, 400, "temperature", "temperature must be >= 0"),
        ({"model": "tiny", "prompt": "word5", "top_p": 0}, 400, "top_p", "top_p must be in (0, 1]"),
        ({"model": "tiny", "prompt": "word5", "max_tokens": -3}, 400, "max_tokens", "max_new_tokens must be >= 0"),
        ({"model": "tiny", "prompt": "word5", "n": 2}, 400, "n", "n=2 is not supported"),
        ({"model": "tiny", "prompt": "word5", "stop": [""]}, 400, "stop", "stop strings must not be empty"),
        ({"model": "tiny", "prompt": "word5", "bogus": 1}, 400, "bogus", "unrecognized request argument(s): bogus"),
        ({"model": "tiny", "prompt": [5, 99999]}, 400, "prompt", "token id 99999 is outside the vocabulary"),
        ({"model": "tiny", "prompt": "word5", "max_tokens": 300}, 400, "max_tokens", "maximum context length is 256 tokens"),
        ({"model": "other", "prompt": "word5"}, 404, "model", "the model 'other' does not exist"),
        ({"prompt": "word5"}, 400, "model", "you must provide a model parameter"),
    ]
    for body, status, param, text in cases:
        code, err, _ = s.post("/v1/completions", body)
        assert code == status and err["error"]["param"] == param and text in err["error"]["message"], (body, err)
    code, err, _ = s.post("/v1/completions", {"model": "tiny", "prompt": "word5 " * 250, "max_tokens": 10})
    assert code == 400 and err["error"]["code"] == "context_length_exceeded"
    assert "256 tokens" in err["error"]["message"] and "250 in the prompt, 10 for the completion" in err["error"]["message"]
    code, err, _ = s.post("/v1/completions", b"{not json")
    assert code == 400 and err["error"]["code"] == "invalid_json"
    code, err, _ = s.post("/v1/completions", b'{"model": "tiny", "prompt": "' + b"word5 " * (1 << 20) + b'"}')  # 6 MiB
    assert code == 413 and err["error"]["code"] == "request_too_large" and "4194304 bytes" in err["error"]["message"]
    code, err, _ = s.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert code == 400 and "no chat template" in err["error"]["message"]  # the tiny tokenizer has none
    with pytest.raises(openai.AuthenticationError) as e:
        s.client("sk-wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as e:
        s.get("/health", key=None)
    assert e.value.code == 401
    assert s.get("/v1/models")["data"][0]["id"] == "tiny"
    pieces = [first] + list(stream)
    assert pieces[-2].choices[0].finish_reason == "length" and pieces[-1].usage.completion_tokens == 150
    assert s.get("/health")["engine"]["failed_steps"] == 0


def test_a_full_queue_answers_503_with_retry_after(tiny_server):
    s = tiny_server
    _idle(s)
    streams = []
    for want in ({"running": 1}, {"running": 2}, {"running": 2, "waiting": 1}):  # max-running 2, max-waiting 1
        streams.append(_long_stream(s, 200))
        deadline = time.monotonic() + 30
        while any(s.get("/health")[k] != v for k, v in want.items()):
            assert time.monotonic() < deadline, s.get("/health")
            time.sleep(0.02)
    code, err, headers = s.post("/v1/completions", {"model": "tiny", "prompt": "word5", "max_tokens": 2})
    assert code == 503 and err["error"]["code"] == "queue_full" and int(headers["Retry-After"]) >= 1
    for x in streams:
        x.close()


def test_a_client_that_goes_away_frees_its_blocks_within_a_step(tiny_server):
    s = tiny_server
    h0 = _idle(s)
    stream = _long_stream(s, 200)
    it = iter(stream)
    next(it), next(it)
    busy = s.get("/health")
    assert busy["running"] == 1 and busy["kv_blocks_free"] < h0["kv_blocks_free"]
    stream.close()  # the client hangs up mid-answer
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = s.get("/health")
        if h["running"] == 0:
            break
        time.sleep(0.01)
    assert h["running"] == 0 and h["kv_blocks_free"] == h["kv_blocks"]
    assert h["engine"]["decode_tokens"] < busy["engine"]["decode_tokens"] + 120  # cancelled, not run to its 200 tokens


def test_sigterm_finishes_what_is_in_flight_and_exits_0(tiny_model):
    path, cache = tiny_model
    s = Server([str(path), "--mode", "none", "--cache", str(cache), "--context-tokens", "256", "--served-model-name", "tiny"])
    try:
        stream = _long_stream(s, 120, key=None)
        it = iter(stream)
        got = [next(it)]
        s.proc.send_signal(signal.SIGTERM)
        got += list(it)  # the answer in flight is finished
        assert got[-2].choices[0].finish_reason == "length" and got[-1].usage.completion_tokens == 120
        with pytest.raises((openai.APIConnectionError, openai.APIStatusError)):
            s.client(None).completions.create(model="tiny", prompt="word5", max_tokens=2)
        assert s.proc.wait(timeout=60) == 0
    finally:
        s.stop(signal.SIGKILL)


# -- the real model: the openai client, chat, and a load test -------------------------------------
BUDGET = "300MB"


@pytest.fixture(scope="module")
def real_server(real_model, tmp_path_factory):
    s = Server([str(real_model), "--mode", "int4", "--dtype", "float32", "--memory-budget", BUDGET,
                "--cache", str(tmp_path_factory.mktemp("serve-real")), "--api-key", KEY])
    yield s
    assert s.stop() == 0


NAME = "SmolLM2-135M-Instruct"


@pytest.mark.real
def test_the_openai_client_streams_and_not(real_server):
    c = real_server.client()
    assert [m.id for m in c.models.list().data] == [NAME]
    r = c.completions.create(model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    text = r.choices[0].text
    assert "Paris" in text and r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    parts = list(c.completions.create(model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == text and parts[-1].choices[0].finish_reason == "length"
    msgs = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What is the capital of France?"}]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    answer = r.choices[0].message.content
    assert "Paris" in answer and r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == answer
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # stop strings end the text before them; seeded sampling repeats itself
    r = c.completions.create(model=NAME, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and "7" not in r.choices[0].text and "6" in r.choices[0].text
    a, b = (c.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


@pytest.mark.real
def test_an_over_long_chat_history_is_openais_400_with_the_numbers(real_server):
    c = real_server.client()
    ctx = real_server.get("/v1/models")["data"][0]["max_model_len"]
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "tell me more about the history of computing " * 20}
               for i in range(41)]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=NAME, messages=history, max_tokens=16)
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and f"maximum context length is {ctx} tokens" in err["message"]
    assert "in the prompt, 16 for the completion" in err["message"]


@pytest.mark.real
def test_echo_logprobs_are_the_prompts_own_as_vllm_gives_them(real_server):
    c = real_server.client()
    r = c.completions.create(model=NAME, prompt="The capital of France is", max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("The capital of France is")
    assert len(lp.token_logprobs) == 6 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:]) and lp.tokens[:2] == ["The", " capital"]
    assert all(lp.tokens[i] in lp.top_logprobs[i] for i in range(1, 6))
    assert max(lp.top_logprobs[5].values()) == lp.token_logprobs[5]  # greedy: the generated token is the best


@pytest.mark.real
def test_load_64_requests_16_at_a_time_all_complete_equal_alone_inside_the_budget(real_server):
    """Bounded: 64 requests, 16 in flight, 10 minutes at most. Every response completes; greedy
    outputs equal the same prompts sent alone; the server's anonymous memory stays inside the budget."""
    from runtime.memory import parse_size

    s = real_server
    c = s.client()
    subjects = ["the sea", "a robot", "winter", "the moon", "a library", "coffee", "a train", "mountains",
                "a garden", "music", "the desert", "rain", "a bridge", "the city", "a cat", "stars"]
    prompts = [f"Write one sentence about {x}:" for x in subjects]

    def ask(p: str) -> tuple[str, str, int]:
        r = c.completions.create(model=NAME, prompt=p, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    alone = {p: ask(p) for p in prompts}  # one at a time: each runs alone in the engine
    base = s.get("/health")["memory"]["baseline_anon_bytes"]
    peak, stop = [0], threading.Event()

    def sample() -> None:  # in this process: the server is not slowed by its own measurement
        while not stop.is_set():
            peak[0] = max(peak[0], _anon_bytes(s.proc.pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(ask, prompts[i % 16]) for i in range(64)]
            results = [f.result(timeout=600 - (time.monotonic() - t0)) for f in futures]
    finally:
        stop.set()
        sampler.join()
    assert all(r[1] == "length" and r[2] == 16 for r in results)  # every response complete
    assert [r[0] for r in results] == [alone[prompts[i % 16]][0] for i in range(64)]
    h = s.get("/health")
    assert h["engine"]["max_batch"] >= 8 and h["running"] == 0 and h["kv_blocks_free"] == h["kv_blocks"]
    over = peak[0] - base
    print(f"load test: {time.monotonic() - t0:.1f} s; peak anonymous memory {over / 1e6:.0f} MB over the import baseline "
          f"(budget {BUDGET}); max batch {h['engine']['max_batch']}")
    assert over <= parse_size(BUDGET), f"peak {over / 1e6:.0f} MB over the baseline, budget {BUDGET}"


@pytest.mark.slow
@pytest.mark.real
def test_lm_eval_scores_through_the_server_as_its_hf_model_does(real_model, tmp_path):
    """The real lm-eval package (its own environment) scores a local multiple-choice task through
    the server's /v1/completions (echo + logprobs); every choice's log-likelihood equals what
    lm-eval's hf model computes with transformers in memory (mode none, fp32)."""
    import importlib.util

    from sli.offline.fetch import sli_home

    exe = sli_home() / "peers" / "venv-bench" / "bin" / "lm_eval"
    task = Path(__file__).resolve().parent.parent / "scripts" / "peers" / "lmeval_task"
    if not exe.exists() or not task.is_dir():
        pytest.skip(f"needs lm-eval at {exe} and the task at {task} (scripts/setup_peers.sh)")
    spec = importlib.util.spec_from_file_location("measure_lmeval_serve", task.parent.parent / "measure_lmeval_serve.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    ref, ref_ll = m.lm_eval(str(exe), ["--model", "hf", "--model_args", f"pretrained={real_model},dtype=float32", "--device", "cpu"],
                            str(task), "sli_mc", tmp_path / "hf")
    s = Server([str(real_model), "--mode", "none", "--dtype", "float32", "--cache", str(tmp_path / "c"), "--served-model-name", "m"])
    try:
        args = f"model=m,base_url={s.url}/v1/completions,tokenizer={real_model},tokenizer_backend=huggingface,num_concurrent=4"
        got, ll = m.lm_eval(str(exe), ["--model", "local-completions", "--model_args", args], str(task), "sli_mc", tmp_path / "serve")
    finally:
        assert s.stop() == 0
    assert ll.keys() == ref_ll.keys() and len(ll) == 20
    assert max(abs(x - y) for d in ll for x, y in zip(ll[d], ref_ll[d])) < 1e-3
    assert got["acc,none"] == ref["acc,none"] and got["acc_norm,none"] == ref["acc_norm,none"]
