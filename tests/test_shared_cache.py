"""One cache, many users: stores of one process, processes beside each other, any order of calls.

Step by step: every codec decodes outside inference mode after decoding inside it; a map
another process grew is adopted, or refused with the fix while records are used in place.
End to end (tiny models, real processes): one process mixes every call of the API on every
mode and quantizes into the cache it reads; a reader keeps generating while other processes
quantize into its cache and `sli inspect --verify` checks it; greedy tokens equal a quiet run's.
The same on the real model, where the writers grow the file past what a reader had mapped
(the case that failed with MDB_MAP_RESIZED), is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cache.codecs import CodecName, get_codec
from cache.errors import CacheGrewError
from cache.manifest import GroupEntry
from cache.store import LayerStore
from conftest import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PROMPTS = ["word5 word9 word13 word5 word9", "word40 word41 word42", "word7 word7 word100 word3"]


# -- step by step ---------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", [c for c in CodecName])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_codec_decodes_outside_inference_mode_after_inside(codec, dtype):
    """State a decode keeps between calls (scratch, lookup tables) made inside inference mode
    must not break a later decode outside it (a model decoding its kept layers at load)."""
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    c = get_codec(codec)
    params = {"group_size": 32} if "group" in codec.value else {}
    enc = c.encode(w, **params)
    ref = c.decode(enc, torch.float32)
    out = torch.empty(48, 128, dtype=dtype)
    with torch.inference_mode():
        c.decode_into(enc, out)
    again = torch.empty(48, 128, dtype=dtype)
    c.decode_into(enc, again)  # before: "Inplace update to inference tensor outside InferenceMode"
    tol = 0 if dtype == torch.float32 else 5e-2  # bf16 arithmetic in the decode
    assert torch.allclose(again.float(), ref, atol=tol, rtol=tol) and torch.equal(again, out)


def _group(name: str, n: int) -> GroupEntry:
    return GroupEntry(name, [])


_WRITER = textwrap.dedent("""
    import sys
    import cache.envs
    from cache.manifest import GroupEntry
    from cache.store import LayerStore
    cache.envs.MAP_BYTES = 4 << 20  # capped here too: the map it grows to is the one the reader adopts
    with LayerStore(sys.argv[1]) as st:
        blob = bytes(range(256)) * (1 << 12)  # 1 MiB
        for i in range(int(sys.argv[2])):
            st.put_group("grown", GroupEntry(f"layer.{i}", []), {f"t{i}": blob})
""")


def test_a_map_grown_by_another_process_is_adopted_or_refused_with_the_fix(tmp_path, monkeypatch):
    """The map is 1 TiB of address space, so this needs a capped map (as `ulimit -v` caps it):
    then another process writing past it is LMDB's MDB_MAP_RESIZED at the next transaction."""
    monkeypatch.setattr("cache.envs.MAP_BYTES", 4 << 20)
    cache = tmp_path / "c"
    with LayerStore(cache) as st:
        st.put_group("v", _group("layer.0", 0), {"a": b"x" * 1000})
    r = LayerStore(cache, readonly=True)
    small = r.map_size
    assert small < 24 << 20
    subprocess.run([sys.executable, "-c", _WRITER, str(cache), "24"], check=True, env=ENV, timeout=120)
    assert r.raw_record("grown", "t23") is not None  # MDB_MAP_RESIZED at begin: adopted, then read
    assert r.map_size > small
    # a record held in place from the map: it cannot move, so the next growth is refused with the fix
    held = r.open_reader()
    subprocess.run([sys.executable, "-c", _WRITER.replace('"grown"', '"grown2"'), str(cache), str(2 * (r.map_size >> 20))],
                   check=True, env=ENV, timeout=120)
    with pytest.raises(CacheGrewError, match=r"grew to \d+ MiB in another process.*close this model and open it again"):
        r.raw_record("grown2", "t0")
    held.close()
    assert r.raw_record("grown2", "t0") is not None  # nothing in place any more: adopted
    r.close()


# -- one process, every call, every mode -----------------------------------------------------------
MODES = ["none", "int8", "int8_dynamic", "nf4", "fp4", "int4", "int3"]


def test_one_process_mixes_every_call_on_every_mode_in_one_cache(tmp_path):
    """Quantize a mode, generate (streaming and holding everything, fp32 and bf16), logits,
    perplexity, then quantize the next mode into the same cache while every earlier processor
    stays open; at the end every processor still gives its first greedy tokens."""
    from sli import QuantizationConfig, UniversalSLIProcessor

    model = make_tiny_model(tmp_path, "llama", layers=3, seed=5)
    cache = tmp_path / "cache"
    text = " ".join(f"word{(i * 7) % 300}" for i in range(120))
    open_: list[tuple[object, str, list[int]]] = []
    for mode in MODES:
        for budget, dtype in (("2MB", "float32"), (None, "bfloat16")):  # streams every layer / holds everything
            p = UniversalSLIProcessor(str(model), quantization_config=QuantizationConfig(mode=mode), cache_dir=str(cache),
                                      memory_budget=budget, dtype=dtype, progress=False)
            first = p.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True).token_ids
            assert p.logits(torch.tensor([[5, 9, 13]])).shape[-1] == 320
            assert p.perplexity(text, max_length=64) > 1
            open_.append((p, f"{mode}/{budget}/{dtype}", first))
        for p, what, first in open_:  # the earlier ones, after a new variant was written beside them
            assert p.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True).token_ids == first, what
    with LayerStore(cache, readonly=True) as st:
        assert len(st.list_variants()) == len(MODES)
    for p, _, _ in open_:
        p.close()


# -- processes beside each other -------------------------------------------------------------------
_READER = textwrap.dedent("""
    import json, os, sys, time
    from sli import UniversalSLIProcessor, QuantizationConfig
    model, cache, mode, budget, stop_file, ready = sys.argv[1:7]
    prompts = json.loads(sys.argv[7])
    p = UniversalSLIProcessor(model, quantization_config=QuantizationConfig(mode=mode), cache_dir=cache,
                              memory_budget=None if budget == "all" else budget, progress=False)
    rounds = after = 0
    deadline = time.monotonic() + 900
    while after < 2 and time.monotonic() < deadline:  # two more rounds once the writers are done
        if os.path.exists(stop_file):
            after += 1
        out = [p.generate(q, max_new_tokens=8, ignore_eos=True).token_ids for q in prompts]
        print(json.dumps(out), flush=True)
        rounds += 1
        open(ready, "w").close()
    p.close()
""")


def _reader(model: Path, cache: Path, mode: str, budget: str, stop: Path) -> subprocess.Popen:
    ready = stop.with_name(f"{stop.name}.{mode}.{budget}.ready")
    proc = subprocess.Popen([sys.executable, "-c", _READER, str(model), str(cache), mode, budget, str(stop), str(ready),
                             json.dumps(PROMPTS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    proc.ready = ready
    return proc


def _sli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sli.cli", *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def _rounds(proc: subprocess.Popen) -> list[list[list[int]]]:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("[")]


def _writers_beside(readers: list[subprocess.Popen], model: Path, cache: Path, modes: list[str], stop: Path) -> None:
    """Quantize ``modes`` one after another into ``cache`` and verify it after each, while the readers run."""
    deadline = time.monotonic() + 600
    while not all(r.ready.exists() for r in readers):  # each has generated once: its cache is open and in use
        assert all(r.poll() is None for r in readers) and time.monotonic() < deadline
        time.sleep(0.1)
    try:
        for mode in modes:
            q = _sli("quantize", str(model), "--mode", mode, "--cache", str(cache))
            assert q.returncode == 0, q.stderr[-3000:]
            v = _sli("inspect", str(cache), "--verify")
            assert v.returncode == 0 and "corrupt" not in v.stdout.lower(), (v.stdout[-2000:], v.stderr[-2000:])
            assert all(r.poll() is None for r in readers), "a reader died while the cache was written"
    finally:
        stop.touch()


def test_readers_keep_generating_while_other_processes_quantize_into_their_cache(tmp_path):
    model = make_tiny_model(tmp_path, "llama", layers=3, seed=6)
    cache = tmp_path / "cache"
    q = _sli("quantize", str(model), "--mode", "int8", "--cache", str(cache))
    assert q.returncode == 0, q.stderr[-3000:]
    stop = tmp_path / "writers-done"
    readers = [_reader(model, cache, "int8", "2MB", stop)]  # streams every layer (the servers' test holds them)
    _writers_beside(readers, model, cache, ["nf4", "int4"], stop)
    for r in readers:  # each reader's first round ran before any writer started: the quiet run
        rounds = _rounds(r)
        quiet = rounds[0]
        assert len(rounds) >= 3 and all(x == quiet for x in rounds), (quiet, rounds)


@pytest.mark.real
@pytest.mark.slow
def test_a_reader_of_the_real_model_survives_writers_growing_the_file_past_its_map(real_model, tmp_path):
    """The case that failed: a reader's map covered the file as it was (and 256 MiB at least);
    quantizing `none` and `nf4` beside it adds ~370 MB, and its next transaction was
    MDB_MAP_RESIZED. Now every map is 1 TiB of address space."""
    cache = tmp_path / "cache"
    q = _sli("quantize", str(real_model), "--mode", "int8", "--cache", str(cache))
    assert q.returncode == 0, q.stderr[-3000:]
    before = (cache / "data.mdb").stat().st_size
    stop = tmp_path / "writers-done"
    reader = _reader(real_model, cache, "int8", "64MB", stop)
    _writers_beside([reader], real_model, cache, ["none", "nf4"], stop)
    assert (cache / "data.mdb").stat().st_size > max(before, 256 << 20)
    rounds = _rounds(reader)  # the first round ran before any writer started
    assert len(rounds) >= 3 and all(x == rounds[0] for x in rounds), rounds


def test_two_servers_on_one_cache_answer_while_sli_quantize_writes_into_it(tmp_path):
    """Two `sli serve` processes on one cache, each answering greedy completions in a loop,
    while `sli quantize` writes two variants into that cache and `sli inspect --verify` checks
    it: no error, and every answer equals the servers' first (quiet) ones."""
    pytest.importorskip("openai", reason="the openai client is a dev dependency: pip install -e '.[dev]'")
    import threading

    from serverutil import KEY, Server

    model = make_tiny_model(tmp_path, "llama", layers=3, seed=7)
    cache = tmp_path / "cache"
    common = ["--mode", "int8", "--cache", str(cache), "--context-tokens", "256", "--api-key", KEY, "--served-model-name", "tiny"]
    servers = [Server([str(model), *common]), Server([str(model), *common, "--memory-budget", "2MB"])]
    try:
        def ask(s: Server) -> list[list[str]]:
            c = s.client()
            return [c.completions.create(model="tiny", prompt=q, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text for q in PROMPTS]

        quiet = [ask(s) for s in servers]
        answers: list[list] = [[], []]
        errors: list[BaseException] = []
        stop = threading.Event()

        def loop(i: int) -> None:
            try:
                while not stop.is_set() or len(answers[i]) < 2:
                    answers[i].append(ask(servers[i]))
            except BaseException as e:  # collected and failed below
                errors.append(e)

        threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        try:
            for mode in ("nf4", "int4"):
                q = _sli("quantize", str(model), "--mode", mode, "--cache", str(cache))
                assert q.returncode == 0, q.stderr[-3000:]
                v = _sli("inspect", str(cache), "--verify")
                assert v.returncode == 0, (v.stdout[-2000:], v.stderr[-2000:])
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=600)
        assert not errors, errors
        for i, s in enumerate(servers):
            assert s.proc.poll() is None and s.get("/health")["status"] == "ok"
            assert answers[i] and all(a == quiet[i] for a in answers[i]), (quiet[i], answers[i])
    finally:
        for s in servers:
            assert s.stop() == 0, "".join(s.log[-30:])


_QUANTIZE = textwrap.dedent("""
    import logging, sys
    from sli import UniversalSLIProcessor, QuantizationConfig
    logging.basicConfig(level=logging.INFO)
    r = UniversalSLIProcessor(sys.argv[1], quantization_config=QuantizationConfig(mode="int4"), cache_dir=sys.argv[2],
                              progress=False).quantize()
    print("BUILT", r.built_groups, "RESUMED", r.resumed_groups, flush=True)
""")


def test_two_writers_of_one_variant_build_it_once(tmp_path):
    """Two processes quantizing the same variant into one cache at once: the second waits for
    the first and finds it complete, so no group is built twice and the manifest is written once.
    The test holds the variant's lock until both wait on it, so they do meet."""
    from sli import QuantizationConfig, UniversalSLIProcessor

    model = make_tiny_model(tmp_path, "llama", layers=3, seed=8)
    cache = tmp_path / "cache"
    vid = UniversalSLIProcessor(str(model), quantization_config=QuantizationConfig(mode="int4"), cache_dir=str(cache),
                                progress=False).variant_id
    logs = [tmp_path / f"writer{i}.log" for i in range(2)]
    with LayerStore(cache) as st, st.variant_lock(vid):
        procs = [subprocess.Popen([sys.executable, "-c", _QUANTIZE, str(model), str(cache)], stdout=subprocess.PIPE,
                                  stderr=open(log, "w"), text=True, env=ENV) for log in logs]
        deadline = time.monotonic() + 300
        while not all("being written by another writer" in log.read_text() for log in logs):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, [log.read_text()[-2000:] for log in logs]
            time.sleep(0.1)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [log.read_text()[-2000:] for log in logs]
    built = sorted(int(o.split()[1]) for o in outs)
    with LayerStore(cache, readonly=True) as st:
        groups = len(st.require_manifest(vid).groups)
    assert built == [0, groups], outs  # one built every group, the other none


def test_spill_stores_on_one_directory_share_it_and_follow_a_rotation(tmp_path):
    """Two processors on one cache spill to one directory: in one process they share its
    environment (opening it twice was taken for damage and set the first one's blocks aside);
    when one sets it aside as damaged and starts afresh, the other follows the new one."""
    from cache.kvstore import KVSpillStore

    block = torch.arange(64, dtype=torch.float32).view(4, 16)
    a, b = KVSpillStore(tmp_path / "kv-spill"), KVSpillStore(tmp_path / "kv-spill")
    assert a.put(b"h1" * 16, block) and torch.equal(b.get(b"h1" * 16, shape=(4, 16), dtype=torch.float32), block)
    assert not (tmp_path / "kv-spill.damaged").exists()
    a._damaged(RuntimeError("pages that are not LMDB's"))  # as another process does when it finds it damaged
    assert (tmp_path / "kv-spill.damaged").exists()
    assert b.get(b"h1" * 16, shape=(4, 16), dtype=torch.float32) is None  # the new store: the old block is gone
    assert b.put(b"h2" * 16, block) and torch.equal(a.get(b"h2" * 16, shape=(4, 16), dtype=torch.float32), block)
    a.close()
    b.close()
