"""Pipeline stages across processes (gloo on loopback): the layers split over 2 and 3 ranks
give the tokens one process gives, faults end requests with the stage named, and the ranks
refuse a world of different caches.

Units first (the split, a stage's plan, stages chained in one process), then real processes:
ranks started as torchrun starts them (``RANK``, ``WORLD_SIZE``, ``MASTER_*``), the CLI under
torchrun itself, and `sli serve` with a rank killed or stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from cache import LayerStore
from conftest import TINY_TYPES, make_tiny_model
from runtime.budget import BudgetTooSmallError
from runtime.executor import StreamingModel
from runtime.pipeline import PipelineConfig, split_layers
from runtime.sizing import Stage
from sli import QuantizationConfig, UniversalSLIProcessor

HERE = Path(__file__).parent
ROOT = HERE.parent
CHILD = HERE / "pipeline_child.py"


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_root):
    """A 6-layer tiny llama, unquantized (fp32) and int4 (bf16, the packed kernel), in one cache each."""
    path = make_tiny_model(tiny_root, "llama", layers=6, seed=29)
    out = {}
    for mode in ("none", "int4"):
        d = tmp_path_factory.mktemp(f"pipe-{mode}")
        r = UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode=mode), cache_dir=d, progress=False).quantize()
        out[mode] = (d, r.variant_id)
    out["model"] = path
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, size: int, port: int) -> dict:
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}


def _ranks(size: int, cmd: list[str], *, stdout=subprocess.DEVNULL) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen(cmd, env=_env(r, size, port), stdout=stdout, stderr=subprocess.PIPE, text=True)
            for r in range(size)]


def _wait(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        out.append((p.returncode, err))
    return out


# -- units ------------------------------------------------------------------------------------------
def test_split_layers():
    assert [(s.start, s.stop) for s in split_layers(30, [1, 1, 1, 1])] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert [(s.start, s.stop) for s in split_layers(10, [3e9, 1e9])] == [(0, 8), (8, 10)]
    assert [len(s.layers) for s in split_layers(4, [100, 1, 1, 1])] == [1, 1, 1, 1]  # every stage keeps a layer
    stages = split_layers(7, [1, 1, 1])
    assert stages[0].first and not stages[0].last and stages[-1].last and sum(len(s.layers) for s in stages) == 7
    with pytest.raises(ValueError, match="3 ranks cannot split a model of 2 layers"):
        split_layers(2, [1, 1, 1])
    with pytest.raises(ValueError, match="stop <= 6"):
        Stage(4, 7, 6)
    with pytest.raises(ValueError, match="at most half of timeout_s"):
        PipelineConfig(timeout_s=3, heartbeat_s=2)


def test_stages_chained_in_one_process_match_the_whole_model(caches):
    """Each stage plans only its layers (and the embeddings or head), and the stages' outputs
    handed on by hand give the whole model's logits: fp32 exactly, the packed int4 kernel too."""
    for mode, dtype in (("none", torch.float32), ("int4", torch.bfloat16)):
        d, vid = caches[mode]
        with LayerStore(d, readonly=True) as st:
            ids = torch.randint(4, 300, (2, 11), generator=torch.Generator().manual_seed(1))
            whole = StreamingModel(st, vid, memory_budget=1 << 40, dtype=dtype, context_tokens=64)
            want = whole.logits(ids)
            stages = [StreamingModel(st, vid, memory_budget=1 << 40, dtype=dtype, context_tokens=64, stage=s)
                      for s in (Stage(0, 1, 6), Stage(1, 5, 6), Stage(5, 6, 6))]
            assert [[u.name for u in s.units] for s in stages] == [
                ["layer.0"], ["layer.1", "layer.2", "layer.3", "layer.4"], ["layer.5", "head"]]
            kv = [s.plan.fixed["kv cache"] for s in stages]
            assert kv[1] == 4 * kv[0] and whole.plan.fixed["kv cache"] == 6 * kv[0]  # a stage's KV is its layers'
            h = ids
            for s in stages:
                h = s.run_stage(h, use_cache=False)
            assert torch.equal(h.logits.float(), want), mode
            for s in stages:
                s.close()
            whole.close()


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_stages_of_every_architecture_match_the_whole_model(tmp_path, tiny_root, model_type):
    """Tied embeddings, int4 on the packed kernel: the last stage computes the head from the
    packed embedding matrix as the whole model does (it once fell back to the records), for
    every architecture the registry runs (gemma's embedding scale included)."""
    path = make_tiny_model(tiny_root, model_type, layers=4, seed=3, tie_word_embeddings=True)
    r = UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode="int4"), cache_dir=tmp_path, progress=False).quantize()
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with LayerStore(tmp_path, readonly=True) as st:
        kw = dict(memory_budget=1 << 40, dtype=torch.bfloat16, context_tokens=64)
        whole = StreamingModel(st, r.variant_id, **kw)
        want = whole.logits(ids)
        h = ids
        for s in (Stage(0, 1, 4), Stage(1, 3, 4), Stage(3, 4, 4)):
            m = StreamingModel(st, r.variant_id, stage=s, **kw)
            assert (m.head_derived is not None) == (whole.head_derived is not None and s.last)  # the packed head: last stage only
            h = m.run_stage(h, use_cache=False)
            m.close()
        assert torch.equal(h.logits.float(), want)
        whole.close()


def test_a_stage_below_one_layer_says_what_it_needs(caches):
    d, vid = caches["none"]
    with LayerStore(d, readonly=True) as st, pytest.raises(BudgetTooSmallError, match=r"--memory-budget \d+MB"):
        StreamingModel(st, vid, memory_budget=20_000, dtype=torch.float32, context_tokens=64, stage=Stage(2, 4, 6))


# -- ranks in processes ------------------------------------------------------------------------------
def test_messages_keep_their_order_with_empty_tensors_in_flight():
    """Several messages in flight at once, empty tensors among them (a micro-batch that keeps no
    logits): each arrives whole and in order."""
    procs = _ranks(2, [sys.executable, str(HERE / "wire_child.py")], stdout=subprocess.PIPE)
    out = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in out]
    assert out[1][0].strip() == "ok"


@pytest.mark.parametrize("size,mode,micro", [(2, "none", 0), pytest.param(3, "none", 1, marks=pytest.mark.slow), (3, "int4", 3)])
def test_ranks_give_the_single_process_tokens(tmp_path, caches, size, mode, micro):
    """Greedy tokens of plain, left-padded batched, prefix-cached and engine (continuous batch)
    generation over 2 and 3 ranks equal one process holding the whole model; micro-batches on
    and off; the packed int4 kernel in bf16 too."""
    d, vid = caches[mode]
    out = tmp_path / "result.json"
    spec = {"cache": str(d), "variant": vid, "dtype": "float32" if mode == "none" else "bfloat16", "out": str(out),
            "micro_batches": micro}
    results = _wait(_ranks(size, [sys.executable, str(CHILD), json.dumps(spec)]))
    assert all(rc == 0 for rc, _ in results), "\n".join(err[-3000:] for _, err in results)
    r = json.loads(out.read_text())
    assert [s["layers"] for s in r["stages"]] == [[s.start, s.stop] for s in split_layers(6, [1] * size)]
    assert r["stages"][0]["embeddings"] and r["stages"][-1]["head"]
    assert r["logits_max_abs_diff"] == 0.0
    assert r["dynamic"][0] == r["dynamic"][1]
    assert r["padded_batch"][0] == r["padded_batch"][1]
    for got, want, cached_p, cached_w in r["paged"]:
        assert got == want and cached_p == cached_w
    assert r["paged"][1][2] == 32  # the second run reused two full blocks of the 40-token prompt
    for key in ("engine", "engine_chunked"):
        got, want, batch_p, batch_w = r[key]
        assert got == want and batch_p == batch_w > 1, key
    assert r["micro_batches"] == (size if micro == 0 else micro)
    wire = r["wire"]
    assert len(wire) == size and all(w["bytes_sent"] > 0 for w in wire)


def test_ranks_of_different_caches_are_refused_with_both_fingerprints(tmp_path, caches):
    (d0, v0), (d1, v1) = caches["none"], caches["int4"]
    port = _free_port()
    procs = []
    for rank, (d, v) in enumerate([(d0, v0), (d1, v1)]):
        spec = {"cache": str(d), "variant": v, "dtype": "float32", "out": str(tmp_path / "x.json")}
        procs.append(subprocess.Popen([sys.executable, str(CHILD), json.dumps(spec)], env=_env(rank, 2, port),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    results = _wait(procs, timeout=120)
    for rc, err in results:
        assert rc != 0
        assert "WorldMismatchError" in err and f"rank 0 on {socket.gethostname()}: model" in err
        assert f"variant {v0}" in err and f"variant {v1}" in err


def test_cli_generate_under_torchrun_prints_what_one_process_prints(caches):
    d, _ = caches["none"]
    args = ["generate", str(d), "--prompt", "word5 word9 word11 word40", "--max-new-tokens", "8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    single = subprocess.run([sys.executable, "-m", "sli", *args], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    port = _free_port()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                          "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "sli", *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == single.stdout and run.stdout.startswith("word5 word9 word11 word40word")
    assert "pipeline of 2 stages: stage 0 on" in run.stderr and "layers 3-5 of 6, head" in run.stderr


# -- faults ------------------------------------------------------------------------------------------
def _serve_ranks(d: Path, size: int, http_port: int, *extra: str) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "sli", "serve", str(d), "--port", str(http_port), "--pipeline-timeout", "4",
           "--pipeline-heartbeat", "1", "--restart-grace", "3", *extra]
    return _ranks(size, cmd)


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _ready(url: str, procs, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _get(url + "/health")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.3)
    for p in procs:
        p.kill()
    raise AssertionError("the pipeline server did not start:\n" + "\n".join(p.communicate()[1][-2000:] for p in procs))


@pytest.mark.parametrize("fault", ["killed", pytest.param("stopped", marks=pytest.mark.slow)])
def test_a_lost_stage_ends_requests_names_the_stage_and_stops_the_server(caches, fault):
    """A rank killed (its socket closes) or stopped (it never answers) is found within the
    ring's timeout: the request in flight ends with the stage named, /health says which stage
    is gone (503), new requests get 503, and rank 0 exits with 75 for torchrun to restart."""
    d, _ = caches["none"]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    procs = _serve_ranks(d, 3, port)
    try:
        _ready(url, procs)
        body = {"model": Path(d).name, "prompt": "word5 word9 word11", "max_tokens": 6, "temperature": 0}
        ok, first = _post(url + "/v1/completions", body)
        assert ok == 200 and first["choices"][0]["text"]
        status, health = _get(url + "/health")
        assert status == 200 and [s["layers"] for s in health["pipeline"]["stages"]] == [[0, 2], [2, 4], [4, 6]]
        victim = procs[1]
        if fault == "killed":
            victim.kill()
        else:
            victim.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        status, err = _post(url + "/v1/completions", {**body, "max_tokens": 200})
        found_s = time.monotonic() - t0
        assert status == 500 and "StageLostError: stage 1 (rank 1, layers 2-3 of 6" in err["error"]["message"], err
        assert found_s < 4 + 2 * 1 + 5  # the ring's timeout, the heartbeat check, slack
        status, health = _get(url + "/health")
        assert status == 503 and "stage 1 (rank 1" in health["status"] and health["pipeline"]["error"]
        status, err = _post(url + "/v1/completions", body)
        assert status == 503 and err["error"]["code"] == "stage_lost"
        assert procs[0].wait(timeout=30) == 75
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.communicate()


@pytest.mark.slow
def test_torchrun_restarts_the_world_and_serving_resumes(caches, tmp_path):
    """Two torchrun agents (two "hosts"): rank 1 killed, the agents re-form the world, and the
    server answers again with the same greedy text."""
    d, _ = caches["none"]
    rdzv, port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}", "-m", "sli", "serve", str(d), "--port", str(port),
           "--pipeline-timeout", "4", "--pipeline-heartbeat", "1", "--restart-grace", "2"]
    agents = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"agent{i}.log", "w"),
                               start_new_session=True) for i in range(2)]
    try:
        _ready(url, agents)
        body = {"model": Path(d).name, "prompt": "word5 word9 word11", "max_tokens": 6, "temperature": 0}
        status, before = _post(url + "/v1/completions", body)
        assert status == 200
        ranks = subprocess.run(["pgrep", "-f", f"sli serve {d}"], capture_output=True, text=True).stdout.split()
        worker = [int(p) for p in ranks if f"RANK=1\0" in Path(f"/proc/{p}/environ").read_text(errors="replace")]
        assert len(worker) == 1
        os.kill(worker[0], signal.SIGKILL)
        deadline = time.monotonic() + 240
        answer = None
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                status, answer = _post(url + "/v1/completions", body)
            except (urllib.error.URLError, ConnectionError):
                continue
            if status == 200:
                break
        assert status == 200 and answer["choices"][0]["text"] == before["choices"][0]["text"]
    finally:
        for a in agents:
            os.killpg(a.pid, signal.SIGTERM)
        for a in agents:
            try:
                a.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(a.pid, signal.SIGKILL)


# -- the benchmark -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_pipeline_runs_every_point_and_reports_ratios(tmp_path, caches):
    """`sli bench --pipeline` on the tiny model: one process in RAM, one streaming at one rank's
    budget in a cgroup, two ranks in cgroups of their own; the pipeline's greedy tokens equal
    the in-RAM process's at every batch size, and every rank's bytes on the wire are counted."""
    import shutil

    from sli.bench_pipeline import PipelineBenchConfig, markdown, run_pipeline_bench
    from sli.bench_scale import MemoryCgroup

    try:
        MemoryCgroup(1 << 30, tag="-probe").close()
    except OSError as e:
        pytest.skip(f"this host offers no memory cgroup: {e}")
    work = tmp_path / "scale-tiny"
    work.mkdir()
    shutil.copytree(caches["model"], work / "llama-tiny-shape")
    r = UniversalSLIProcessor(work / "llama-tiny-shape", quantization_config=QuantizationConfig(mode="int4"),
                              cache_dir=work / "cache-int4", progress=False).quantize()
    assert r.variant_id
    cfg = PipelineBenchConfig(shapes=("tiny",), splits={"tiny": (2, "48MB")}, batch_sizes=(1, 3), prompt_tokens=8,
                              new_tokens=5, workdir=str(tmp_path), out_dir=str(tmp_path / "out"), llama_rpc=False, timeout_s=300)
    res = run_pipeline_bench(cfg)
    s = res["shapes"]["tiny"]
    ram, stream, pipe = s["in_ram"], s["streaming"], s["pipeline"]
    assert not ram["error"] and not stream["error"] and all(not p["error"] for p in pipe), (ram, stream, pipe)
    assert [p["batch"] for p in pipe[0]["points"]] == [1, 3]
    for pr, rr in zip(pipe[0]["points"], ram["points"]):
        assert pr["decode_tok_s"] > 0 and pr["tokens"] == rr["tokens"] and len(pr["tokens"]) == pr["batch"]
        assert [w["rank"] for w in pr["wire"]] == [0, 1] and all(w["bytes_sent_per_token"] > 0 for w in pr["wire"])
    assert [st["layers"] for st in pipe[0]["stages"]] == [[0, 3], [3, 6]]
    assert stream["cgroup_peak_bytes"] and all(p["cgroup_peak_bytes"] for p in pipe)
    assert pipe[0]["wire_hop_s"] > 0
    text = markdown(res)
    assert "| 3 |" in text and "pipeline / in RAM" in text
