"""`sli bench --pipeline`: a model split into pipeline stages over ranks, each rank a process in
its own memory cgroup on this host (loopback TCP), beside one process streaming it under one
rank's budget and one process holding everything in RAM.

For each shape (the random models of :mod:`sli.bench_scale` in Llama-3.2-1B's and 3.1-8B's
shapes, int4 in bf16 on the packed kernel):

- ``in RAM``: one process holding every layer (no limit, files warm);
- ``streaming``: one process with one rank's budget, cold (files dropped from the page cache),
  in a cgroup of that budget plus the import baseline plus a margin;
- ``pipeline``: N ranks, each with that budget in a cgroup of its own, started cold (each rank
  reads its slice once, then holds it).

Every point decodes the same prompts through the continuous-batching engine with 1, 4 and 16
sequences in the batch (decode tokens per second over all sequences, after every prompt is
prefilled), records the greedy tokens (the pipeline's must equal the in-RAM process's), each
process's peak anonymous memory and cgroup peak, and for the pipeline the bytes each rank sent
per decoded token and the seconds one hidden state spends on one hop of the wire (a round of
the ring with no compute, divided by the hops).

On one host the ranks share its cores: what a pipeline gains over streaming here is that
nothing is read from disk per token; the compute of the stages is not parallel as it would be
across hosts. Figures are ratios of runs made one after the other in one invocation.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sli.bench import RESULT_MARK, run_worker
from sli.bench_scale import CGROUP_MARGIN, MemoryCgroup, drop_caches, import_baseline

logger = logging.getLogger(__name__)

DEFAULT_SPLITS = {"1b": (2, "600MB"), "8b": (4, "2GB")}


@dataclass
class PipelineBenchConfig:
    shapes: tuple[str, ...] = ("1b", "8b")
    splits: dict[str, tuple[int, str]] = field(default_factory=lambda: dict(DEFAULT_SPLITS))  # shape -> (ranks, budget per rank)
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    prompt_tokens: int = 32
    new_tokens: int = 16
    threads: int = 0  # torch threads per process (0: the host's cores)
    workdir: str = ""  # default: $SLI_HOME (the scale models live in scale-<shape>)
    out_dir: str = "docs/results"
    timeout_s: int = 3600
    llama_rpc: bool = True  # llama.cpp's rpc-server with the same split, where its build and GGUF exist


# -- the measurement, in every process that runs a model (rank 0 of a pipeline) ----------------------
def _prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 1, (length,), generator=g).tolist() for _ in range(n)]


def decode_rates(model, tokenizer, *, batch_sizes, prompt_tokens: int, new_tokens: int, on_decode=None) -> list[dict]:
    """For each batch size: decode tok/s (all sequences) through the engine, and the tokens.
    ``on_decode(phase)`` is called with ``"start"`` once every prompt is prefilled and ``"end"``."""
    from runtime.engine import EngineConfig, EngineCore, EngineRequest
    from runtime.generate import SamplingConfig
    from runtime.kv import prefix_session_for

    session = prefix_session_for(model)
    out = []
    for b in batch_sizes:
        core = EngineCore(model, tokenizer, session, EngineConfig(max_running=b, itl_factor=None))
        got: dict[str, list[int]] = {}
        prompts = _prompts(model.config.vocab_size, b, prompt_tokens, seed=1000 + b)  # never a cached prefix
        for i, p in enumerate(prompts):
            got[str(i)] = []
            core.add(EngineRequest(tuple(p), SamplingConfig(max_new_tokens=new_tokens), request_id=str(i)),
                     lambda o: got[o.request_id].extend(o.token_ids))
        t0 = time.perf_counter()
        started = None
        steps = 0
        while core.has_work:
            if started is None and all(got[k] for k in got):
                started = time.perf_counter()
                extra = on_decode("start") if on_decode else None
                decoded_before = sum(len(v) for v in got.values())
            core.step()
            steps += started is not None
        end = time.perf_counter()
        extra_end = on_decode("end") if on_decode else None
        decoded = sum(len(v) for v in got.values()) - decoded_before
        out.append({"batch": b, "decode_tok_s": decoded / (end - started), "decoded_tokens": decoded, "decode_steps": steps,
                    "first_tokens_s": started - t0, "tokens": [got[str(i)] for i in range(b)],
                    **({"wire": _wire_per_token(extra, extra_end, decoded)} if extra is not None else {})})
    return out


def _wire_per_token(before: list[dict], after: list[dict], decoded: int) -> list[dict]:
    return [{"rank": a["rank"], "bytes_sent_per_token": (a["bytes_sent"] - b["bytes_sent"]) / decoded}
            for b, a in zip(before, after)]


def worker_main() -> int:
    """One process of a point: ``spec["role"]`` ``single`` (the whole model) or ``rank``."""
    import torch

    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(spec["threads"])
    from cache import LayerStore
    from runtime.memory import PeakMemorySampler, anon_rss_bytes, parse_size
    from runtime.tokenizer import load_tokenizer

    mem = PeakMemorySampler(interval=0.01).__enter__()
    res: dict[str, Any] = {"import_anon_bytes": anon_rss_bytes()}
    store = LayerStore(spec["cache"], readonly=True)
    vid = store.list_variants()[0]
    ctx = max(spec["batch_sizes"]) * (spec["prompt_tokens"] + spec["new_tokens"] + 16)
    # one kernel everywhere (the packed int4 kernel at every row count), so that every point's
    # greedy tokens can be compared: the rows path's bf16 GEMM rounds differently
    kw = dict(memory_budget=spec["budget"], dtype=torch.bfloat16, context_tokens=ctx, rows_kernel=False)
    t0 = time.perf_counter()
    try:
        if spec["role"] == "rank":
            from runtime.pipeline import PipelineConfig
            from runtime.pipeline.driver import StageWorker, open_stage

            model = open_stage(store, vid, PipelineConfig(timeout_s=600, heartbeat_s=5), **kw)
            res["open_s"] = time.perf_counter() - t0
            if isinstance(model, StageWorker):
                res["stage"] = model.stage.describe()
                res["exit"] = model.run()
                res["peak_anon_bytes"] = mem.peak
                mem.__exit__(None, None, None)
                sys.stdout.write(RESULT_MARK + json.dumps(res) + "\n")
                return 0
            res["stages"] = [s.to_dict() for s in model.stages]
            res["micro_batches"] = model.micro_batches
            hidden = model.config.hidden_size * 2  # one token's hidden state in bf16
            res["wire_hop_s"] = model.probe_wire(hidden)
            res["wire_hop_16_s"] = model.probe_wire(16 * hidden)
            on_decode = lambda phase: model.remote_stats()  # noqa: E731
        else:
            from runtime.executor import StreamingModel

            model = StreamingModel(store, vid, **kw)
            res["open_s"] = time.perf_counter() - t0
            res["plan"] = model.plan.describe()
            on_decode = None
        tok = load_tokenizer(store, model.manifest)
        res["points"] = decode_rates(model, tok, batch_sizes=spec["batch_sizes"], prompt_tokens=spec["prompt_tokens"],
                                     new_tokens=spec["new_tokens"], on_decode=on_decode)
        res["budget_bytes"] = parse_size(spec["budget"])
        model.close()
    except Exception as e:  # noqa: BLE001 - the point reports its error
        res["error"] = f"{type(e).__name__}: {e}"
    res["peak_anon_bytes"] = mem.peak
    mem.__exit__(None, None, None)
    sys.stdout.write(RESULT_MARK + json.dumps(res) + "\n")
    return 0


# -- the driver --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pipeline_point(spec: dict, ranks: int, cgroups: list[MemoryCgroup], timeout_s: int) -> list[tuple[dict, str]]:
    port = _free_port()
    cmd = [sys.executable, "-c", "import sys; from sli.bench_pipeline import worker_main; sys.exit(worker_main())",
           json.dumps({**spec, "role": "rank"})]
    procs = []
    for r in range(ranks):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   TOKENIZERS_PARALLELISM="false")
        procs.append(subprocess.Popen(cgroups[r].wrap(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        line = next((x for x in so.splitlines() if x.startswith(RESULT_MARK)), None)
        if line is None:
            out.append(({}, f"exit {p.returncode}: " + ((se.strip().splitlines() or ["no output"])[-1])))
        else:
            r = json.loads(line.split(" ", 1)[1])
            out.append((r, r.pop("error", "")))
    return out


def run_pipeline_bench(cfg: PipelineBenchConfig, progress=logger.info) -> dict[str, Any]:
    from runtime.memory import parse_size
    from sli.offline.fetch import sli_home

    home = Path(cfg.workdir) if cfg.workdir else sli_home()
    threads = cfg.threads or os.cpu_count() or 1
    res: dict[str, Any] = {"config": asdict(cfg), "host": {"cpus": os.cpu_count(), "cpu": _cpu_name(), "threads": threads},
                           "shapes": {}}
    for shape in cfg.shapes:
        ranks, budget = cfg.splits[shape]
        work = home / f"scale-{shape}"
        model, cache = work / f"llama-{shape}-shape", work / "cache-int4"
        if not (cache / "data.mdb").exists():
            raise FileNotFoundError(f"no int4 cache at {cache}: run `sli quantize {model} --mode int4 --cache {cache}` "
                                    f"(the model: `sli bench --scale {shape}` or scripts/make_synthetic_model.py --shape {shape})")
        base = import_baseline(model)
        limit = parse_size(budget) + base + CGROUP_MARGIN
        spec = {"cache": str(cache), "budget": budget, "threads": threads, "batch_sizes": list(cfg.batch_sizes),
                "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens}
        out: dict[str, Any] = {"ranks": ranks, "budget": budget, "import_baseline_bytes": base, "cgroup_limit_bytes": limit,
                               "cache_bytes": sum(f.stat().st_size for f in cache.rglob("*.mdb"))}
        # the derived (packed) copy is built once, outside any measurement
        progress(f"{shape}: one process holding everything, warm")
        r, err = run_worker("sli.bench_pipeline", {**spec, "role": "single", "budget": "64GB", "batch_sizes": [1]}, cfg.timeout_s)
        r, err = run_worker("sli.bench_pipeline", {**spec, "role": "single", "budget": "64GB"}, cfg.timeout_s)
        out["in_ram"] = {**r, "error": err}
        progress(f"{shape}: one process streaming at {budget}, cold, cgroup of {limit >> 20} MiB")
        drop_caches([cache])
        cg = MemoryCgroup(limit, tag="-single")
        try:
            r, err = run_worker("sli.bench_pipeline", {**spec, "role": "single"}, cfg.timeout_s, wrap=cg.wrap)
            out["streaming"] = {**r, "error": err, "cgroup_peak_bytes": cg.peak_bytes()}
        finally:
            cg.close()
        progress(f"{shape}: pipeline of {ranks} ranks at {budget} each, each in a cgroup of {limit >> 20} MiB, started cold")
        drop_caches([cache])
        cgs = [MemoryCgroup(limit, tag=f"-rank{r}") for r in range(ranks)]
        try:
            results = _pipeline_point(spec, ranks, cgs, cfg.timeout_s)
            out["pipeline"] = [{**r, "error": e, "cgroup_peak_bytes": c.peak_bytes()} for (r, e), c in zip(results, cgs)]
        finally:
            for c in cgs:
                c.close()
        if cfg.llama_rpc:
            out["llama_rpc"] = _llama_rpc(home, shape, ranks, limit, cfg)
        res["shapes"][shape] = out
    return res


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _llama_rpc(home: Path, shape: str, ranks: int, limit: int, cfg: PipelineBenchConfig) -> dict[str, Any]:
    """llama.cpp's rpc-server with the same split (scripts/peers/llama_rpc.py), one process
    and N ranks, where ``scripts/setup_peers.sh llama-rpc`` built it and the shape's Q4_0 exists."""
    bin_dir = home / "peers" / "llama.cpp" / "rpc-avx2" / "bin"
    gguf = home / f"scale-{shape}" / f"llama-{shape}-q4_0.gguf"
    script = Path(__file__).resolve().parent.parent / "scripts" / "peers" / "llama_rpc.py"
    if not (bin_dir / "ggml-rpc-server").exists() or not gguf.exists() or not script.exists():
        return {"error": f"not run: needs {bin_dir}/ggml-rpc-server (scripts/setup_peers.sh llama-rpc) and {gguf}"}
    common = [sys.executable, str(script), "--bin", str(bin_dir), "--gguf", str(gguf), "--threads", str(cfg.threads or os.cpu_count()),
              "--batch", ",".join(map(str, cfg.batch_sizes)), "--tokens", str(cfg.new_tokens), "--prompt", str(cfg.prompt_tokens),
              "--no-wire", "--logs", str(home / "peers" / "llama-rpc-results" / f"logs-{shape}")]
    out = {}
    for name, extra in (("local", ["--local"]), ("rpc", ["--ranks", str(ranks), "--limit-mb", str(limit >> 20)])):
        cp = subprocess.run(common + extra, capture_output=True, text=True, timeout=cfg.timeout_s)
        try:
            out[name] = json.loads(cp.stdout)
        except json.JSONDecodeError:
            out[name] = {"error": (cp.stderr.strip().splitlines() or ["no output"])[-1]}
    return out


# -- the report --------------------------------------------------------------------------------------
def _rates(points: list[dict] | None) -> dict[int, float]:
    return {p["batch"]: p["decode_tok_s"] for p in points or []}


def markdown(res: dict[str, Any]) -> str:
    h = res["host"]
    lines = ["# Pipeline stages over ranks: decode speed and memory", "",
             f"Host: {h['cpu']}, {h['cpus']} cores; {h['threads']} torch threads per process; every rank a process "
             "in its own memory cgroup on this one host, loopback TCP (gloo). The ranks share the host's cores: "
             "across hosts each stage would compute on its own. Models: random weights in real shapes, int4 (group 64) "
             "computed in bf16 on the packed kernel. Decode tok/s: all sequences together, after every prompt is prefilled.", ""]
    for shape, s in res["shapes"].items():
        ram, stream, pipe = s.get("in_ram", {}), s.get("streaming", {}), s.get("pipeline", [{}])
        r_ram, r_stream, r_pipe = _rates(ram.get("points")), _rates(stream.get("points")), _rates(pipe[0].get("points"))
        lines += [f"## {shape}: {s['ranks']} ranks of {s['budget']}", "",
                  f"Cache {s['cache_bytes'] / 1e9:.2f} GB; cgroup per process {s['cgroup_limit_bytes'] >> 20} MiB "
                  f"(budget + import baseline {s['import_baseline_bytes'] >> 20} MiB + margin).", "",
                  "| batch | in RAM, one process (warm) | streaming, one process at the budget (cold) | pipeline | pipeline / in RAM | pipeline / streaming | tokens equal in RAM |",
                  "|---|---|---|---|---|---|---|"]
        for b in res["config"]["batch_sizes"]:
            pr = next((p for p in pipe[0].get("points", []) if p["batch"] == b), None)
            rr = next((p for p in ram.get("points", []) if p["batch"] == b), None)
            same = "yes" if pr and rr and pr["tokens"] == rr["tokens"] else ("no" if pr and rr else "–")
            ratio = lambda a, c: f"{a / c:.2f}x" if a and c else "–"  # noqa: E731
            lines.append(f"| {b} | {r_ram.get(b, 0):.2f} | {r_stream.get(b, 0):.2f} | {r_pipe.get(b, 0):.2f} | "
                         f"{ratio(r_pipe.get(b), r_ram.get(b))} | {ratio(r_pipe.get(b), r_stream.get(b))} | {same} |")
        errs = [f"{k}: {v['error']}" for k, v in (("in RAM", ram), ("streaming", stream)) if v.get("error")]
        errs += [f"rank {i}: {p['error']}" for i, p in enumerate(pipe) if p.get("error")]
        if errs:
            lines += ["", "Errors: " + "; ".join(errs)]
        lines += ["", "| process | layers | peak anonymous MiB | of which imports | budget MiB | cgroup peak MiB | bytes sent per decoded token (batch 1 / 4 / 16) |",
                  "|---|---|---|---|---|---|---|"]
        for i, p in enumerate(pipe):
            st = (pipe[0].get("stages") or [{}] * len(pipe))[i]
            wire = []
            for pt in pipe[0].get("points", []):
                w = next((x for x in pt.get("wire", []) if x["rank"] == i), None)
                wire.append(f"{w['bytes_sent_per_token']:,.0f}" if w else "–")
            lines.append(f"| rank {i} | {st.get('layers', '–')}{' + embeddings' if st.get('embeddings') else ''}"
                         f"{' + head' if st.get('head') else ''} | {p.get('peak_anon_bytes', 0) >> 20} | {p.get('import_anon_bytes', 0) >> 20} | "
                         f"{p.get('budget_bytes', 0) >> 20 or '–'} | {(p.get('cgroup_peak_bytes') or 0) >> 20} | {' / '.join(wire)} |")
        for name, v in (("one process in RAM", ram), ("one process streaming", stream)):
            lines.append(f"| {name} | all | {v.get('peak_anon_bytes', 0) >> 20} | {v.get('import_anon_bytes', 0) >> 20} | "
                         f"{v.get('budget_bytes', 0) >> 20} | {(v.get('cgroup_peak_bytes') or 0) >> 20} | – |")
        if pipe[0].get("wire_hop_s") is not None:
            lines += ["", f"One token's hidden state ({pipe[0].get('wire_hop_s', 0) * 1e6:.0f} µs per hop; 16 tokens' "
                          f"{pipe[0].get('wire_hop_16_s', 0) * 1e6:.0f} µs) over {s['ranks']} hops per token round the ring; "
                          f"micro-batches per batched step: {pipe[0].get('micro_batches')}."]
        rpc = s.get("llama_rpc")
        if rpc:
            summ = _rpc_summary(rpc)
            lines += ["", "llama.cpp (its own Q4_0 of the same random model, AVX2 build with GGML_RPC; scripts/peers/llama_rpc.py), "
                          "the same split, decode tok/s by batch (llama-batched-bench):", "",
                      "| batch | llama.cpp one process | llama.cpp rpc-server split | sli pipeline | sli pipeline / llama.cpp split |", "|---|---|---|---|---|"]
            loc, spl = summ.get("local", {}), summ.get("rpc", {})
            for b in res["config"]["batch_sizes"]:
                lr = loc.get("decode_tok_s", {}).get(b) if isinstance(loc, dict) else None
                sr = spl.get("decode_tok_s", {}).get(b) if isinstance(spl, dict) else None
                lines.append(f"| {b} | {lr or '–'} | {sr or '–'} | {r_pipe.get(b, 0):.2f} | "
                             f"{f'{r_pipe.get(b) / sr:.2f}x' if sr and r_pipe.get(b) else '–'} |")
            lines += ["", f"llama.cpp peak RSS MB: {json.dumps({k: {kk: vv for kk, vv in v.items() if kk != 'decode_tok_s'} if isinstance(v, dict) else v for k, v in summ.items()})}"]
        lines.append("")
    return "\n".join(lines)


def _rpc_summary(rpc: dict) -> dict:
    """Decode tok/s by batch (llama-batched-bench) and peak RSS of each process, per mode."""
    out = {}
    for name, v in rpc.items():
        if not isinstance(v, dict) or v.get("error"):
            out[name] = v.get("error") if isinstance(v, dict) else v
            continue
        runs = v.get("runs", {})
        out[name] = {"decode_tok_s": {int(k.removeprefix("batched-b")): r.get("decode_tok_s") for k, r in runs.items()
                                      if k.startswith("batched-b")},
                     "main_peak_rss_mb": max((r.get("main", {}).get("peak_rss_mb", 0) for r in runs.values()), default=0),
                     "servers_peak_rss_mb": [srv.get("peak_rss_mb") for srv in v.get("servers", [])]}
    return out


def write_outputs(res: dict[str, Any], out_dir: str) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(res, indent=1))
    (out / "pipeline.md").write_text(markdown(res))
    return {"json": str(out / "pipeline.json"), "markdown": str(out / "pipeline.md")}
