"""`sli bench --scale 8b`: a model in real shapes, quantized and streamed on this host, cold
from disk and inside a hard memory limit, beside accelerate and llama.cpp in the same run.

What one run does, in order (``docs/results/scale.md``, ``scale.json``, ``scale.png``):

1. Writes a random model in Llama-3.1-8B's (or Llama-3.2-1B's) shapes with the real model's
   tokenizer (:mod:`sli.synthetic`), unless the work folder has it; checks free disk first.
2. Quantizes it to int4 and nf4, each in a process of its own: MB/s of bf16 input and peak
   anonymous memory.
3. Measures the physical bounds: the disk's cold read speed (one stream, and four reads in
   flight) and the memory bandwidth.
4. Streams at each budget: sli (int4, bf16 compute), accelerate's disk offload with the same
   ``max_memory`` on the bf16 source, and llama.cpp on its own Q4_0 of the same model (made
   with llama.cpp's converter and quantizer). Every point runs in a fresh process; cold points
   start with the files dropped from the page cache and run inside a memory cgroup whose
   limit (anonymous memory and page cache together) is the budget plus the import baseline
   plus :data:`CGROUP_MARGIN`; warm points run without a limit after a warm-up pass.
5. Batching (1, 4, 16 prompts) and read-ahead on/off at the middle budget, cold.

Random weights serve for speed and memory only; no quality claim is made on them. What the
run made is deleted at the end unless ``keep``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cache.readahead import drop_file_cache
from runtime.hostmem import CGROUP_ROOT, own_cgroups
from sli.bench import RESULT_MARK, pyplot, run_worker

logger = logging.getLogger(__name__)

# llama.cpp with use_extra_bufts=false: its Q4_0 weights stay in the mapped file (as sli's and
# accelerate's do) instead of being repacked into anonymous memory at load, which a limit
# smaller than the file kills
LLAMA_MMAP = "llama.cpp (mmap, no repack)"
CGROUP_MARGIN = 256 << 20  # beyond budget + import baseline: allocator slack, records in flight
PROMPT_TEXT = (
    "The history of computing is a story of machines that did not fit. Early computers filled rooms; "
    "their memories were measured in words, and programmers learned to move data between drum, tape "
    "and core so that the part of a problem being worked on was always close at hand. "
)


@dataclass
class ScaleConfig:
    shape: str = "8b"
    workdir: str = ""  # default: $SLI_HOME/scale-<shape>
    out_dir: str = "docs/results"
    budgets: tuple[str, ...] = ("1GB", "2GB", "4GB")
    new_tokens: int = 8
    prompt_tokens: int = 512
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    peers: tuple[str, ...] = ("accelerate", "llama.cpp")
    llama_convert: str = ""  # llama.cpp's convert_hf_to_gguf.py (from its source tree)
    tokenizer_from: str = ""  # a model folder whose tokenizer the random model gets
    keep: bool = False
    timeout_s: int = 1800
    quantize_modes: tuple[str, ...] = ("int4", "nf4")


@dataclass
class ScalePoint:
    system: str
    budget: str
    regime: str  # "cold, cgroup <limit>" or "warm"
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""


# -- host measurements -------------------------------------------------------------------------
def _files(paths: list[Path]) -> list[Path]:
    """The files named, and those under the folders named."""
    return [f for p in paths for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()))]


def drop_caches(paths: list[Path]) -> None:
    """Evict files from the page cache: each file by advice, then the whole cache where allowed."""
    for f in _files(paths):
        drop_file_cache(f)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as e:
        logger.info("cannot drop the whole page cache here (%s); the files were dropped one by one", e)


def disk_read_speed(files: list[Path], *, streams: int, limit: int = 2 << 30) -> float:
    """Bytes/s reading ``limit`` bytes of ``files`` cold, with ``streams`` reads in flight."""
    drop_caches(files)
    ranges = []
    for f in files:
        size = f.stat().st_size
        for off in range(0, size, 8 << 20):
            ranges.append((f, off, min(8 << 20, size - off)))
    ranges = ranges[: max(1, limit // (8 << 20))]
    lock, total = threading.Lock(), [0]

    def worker(part: list) -> None:
        buf = bytearray(8 << 20)
        for f, off, n in part:
            fd = os.open(f, os.O_RDONLY)
            try:
                got = os.preadv(fd, [memoryview(buf)[:n]], off)
            finally:
                os.close(fd)
            with lock:
                total[0] += got

    parts = [ranges[k::streams] for k in range(streams)]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total[0] / (time.perf_counter() - t0)


def memory_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s the host reads from memory (a sum over a buffer far larger than any cache)."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = 0.0
    for _ in range(5):  # all cores, no conversion: as close to the bus as torch gets
        t0 = time.perf_counter()
        x.sum()
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


# -- cgroups ----------------------------------------------------------------------------------
class MemoryCgroup:
    """A child memory cgroup of this process's own (v1 or v2) with a hard limit; processes
    started through :meth:`wrap` run inside it. Raises OSError where none can be made."""

    def __init__(self, limit_bytes: int, root: Path = CGROUP_ROOT, *, tag: str = "") -> None:
        own = own_cgroups(Path("/proc/self/cgroup"))
        if "memory" in own and (root / "memory").is_dir():
            self.version, parent = 1, root / "memory" / own["memory"].lstrip("/")
            files = {"memory.limit_in_bytes": limit_bytes, "memory.memsw.limit_in_bytes": limit_bytes}
        elif 0 in own and (root / "cgroup.controllers").exists():
            self.version, parent = 2, root / own[0].lstrip("/")
            files = {"memory.max": limit_bytes, "memory.swap.max": 0}
        else:
            raise OSError("this host offers no memory cgroup (neither v1's memory controller nor v2)")
        self.path = parent / f"sli-bench-{os.getpid()}-{limit_bytes >> 20}m{tag}"
        self.limit_bytes = limit_bytes
        self.path.mkdir(exist_ok=True)
        for name, value in files.items():
            if (self.path / name).exists():
                (self.path / name).write_text(str(value))
        if (self.path / "memory.limit_in_bytes").exists() and int((self.path / "memory.limit_in_bytes").read_text()) > limit_bytes:
            raise OSError(f"cgroup {self.path} did not take the limit {limit_bytes}")

    def wrap(self, cmd: list[str]) -> list[str]:
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *cmd]

    def peak_bytes(self) -> int | None:
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            if (self.path / name).exists():
                return int((self.path / name).read_text())
        return None

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError as e:
            logger.warning("could not remove cgroup %s: %s", self.path, e)


# -- workers (each in a process of its own) --------------------------------------------------
def _io_read_bytes() -> int:
    """Bytes this process has had read from storage (Linux ``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise OSError("/proc/self/io has no read_bytes line: this kernel does not account I/O per process")


def _prompt_ids(tok, n: int) -> list[int]:
    text = PROMPT_TEXT * (n // 30 + 2)
    return tok(text)["input_ids"][:n]


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    import torch

    from runtime.memory import PeakMemorySampler, release_free_memory
    from sli.bench import _import_everything

    kind = spec["kind"]
    if kind != "llama.cpp":
        _import_everything(spec["model"])
    release_free_memory()
    io0, faults0 = _io_read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    out: dict[str, Any] = {}
    with PeakMemorySampler(interval=0.005) as mem:
        if kind == "quantize":
            from sli.offline.config import QuantizationConfig
            from sli.processor import UniversalSLIProcessor

            p = UniversalSLIProcessor(spec["model"], quantization_config=QuantizationConfig(mode=spec["mode"]),
                                      cache_dir=spec["cache_dir"], progress=False)
            r = p.quantize()
            out = {"seconds": r.seconds, "MB_per_s": r.mb_per_s, "bits_per_weight": r.bits_per_weight}
        elif kind == "sli":
            from runtime.generate import GenerationOutput
            from sli.processor import UniversalSLIProcessor

            p = UniversalSLIProcessor(spec["model"], quantization_config=spec["mode"], cache_dir=spec["cache_dir"],
                                      memory_budget=spec["budget"], dtype="bfloat16", progress=False,
                                      context_tokens=spec["context_tokens"], readahead=spec.get("readahead"),
                                      spill_limit=0)  # no KV reused from an earlier point's prompt: every prefill computes
            m = p.model
            tok = p.tokenizer
            if spec.get("batch"):
                prompts = [f"{PROMPT_TEXT[k * 7 % 150:]} Question {k}: what comes next?" for k in range(spec["batch"])]
                r = p.generate(prompts, max_new_tokens=spec["new_tokens"], ignore_eos=True)
                s = r.stats
                out = {"ttft_s": s.time_to_first_token_s, "decode_tok_s": s.decode_tokens_per_s, "batch": spec["batch"],
                       "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens}
            else:
                clock, gen = _Clock(), GenerationOutput()
                ids = _prompt_ids(tok, spec["prompt_tokens"])
                clock.start()
                for _ in p.stream(ids, out=gen, max_new_tokens=spec["new_tokens"], ignore_eos=True):
                    clock.tick()
                out = {**clock.summary(len(ids)), "record_bytes_per_token": gen.stats.bytes_read_per_token,
                       "tokens": gen.token_ids}
            out.update(plan=m.plan.describe(), streamed_layers=len(m.plan.streamed_layers),
                       readahead_used=m.loader.reading_ahead, readahead_reason=getattr(m, "readahead_reason", ""))
        elif kind == "accelerate":
            from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

            tok = AutoTokenizer.from_pretrained(spec["model"])
            ids = torch.tensor([_prompt_ids(tok, spec["prompt_tokens"])])
            off = tempfile.mkdtemp(prefix="sli-scale-offload-")
            model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16, device_map="auto",
                                                         max_memory={"cpu": int(spec["budget_bytes"])}, offload_folder=off).eval()
            clock = _Clock()

            class Tick(StoppingCriteria):
                def __call__(self, input_ids, scores, **kw):
                    clock.tick()
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool)

            n = spec["new_tokens"]
            clock.start()
            with torch.inference_mode():
                gen = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, stopping_criteria=StoppingCriteriaList([Tick()]))
            out = {**clock.summary(ids.shape[1]), "tokens": gen[0, ids.shape[1]:].tolist()}
            shutil.rmtree(off, ignore_errors=True)
        elif kind == "llama.cpp":
            import llama_cpp
            from llama_cpp import Llama

            if spec.get("no_repack"):  # keep the weights in the mapped file, as sli and accelerate do
                default = llama_cpp.llama_cpp.llama_model_default_params

                def params():
                    p = default()
                    p.use_extra_bufts = False
                    return p

                llama_cpp.llama_cpp.llama_model_default_params = params
            llm = Llama(model_path=spec["gguf"], n_ctx=spec["context_tokens"], n_threads=os.cpu_count(), n_batch=512,
                        use_mmap=True, verbose=False)
            ids = llm.tokenize(PROMPT_TEXT.encode() * (spec["prompt_tokens"] // 30 + 2), add_bos=True)[: spec["prompt_tokens"]]
            import numpy as np

            def last_logits():
                # llama-cpp-python 0.3.x fills llm.scores only with logits_all=True: read the last
                # token's logits from the context itself
                return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))

            clock, toks = _Clock(), []
            clock.start()
            llm.eval(ids)  # the prefill: the first token's logits are ready
            for _ in range(spec["new_tokens"]):
                toks.append(int(np.argmax(last_logits())))  # greedy, as every other point
                clock.tick()
                if len(toks) < spec["new_tokens"]:
                    llm.eval([toks[-1]])
            out = {**clock.summary(len(ids)), "tokens": toks}
        else:
            raise ValueError(kind)
    r = resource.getrusage(resource.RUSAGE_SELF)
    out.update(peak_anon_bytes=mem.peak_bytes, disk_read_bytes=_io_read_bytes() - io0, major_faults=r.ru_majflt - faults0,
               maxrss_bytes=r.ru_maxrss * 1024)
    return out


class _Clock:
    """Time and disk bytes read at each generated token: the first gives the prefill (time to
    first token), the rest the decode rate and the bytes read from disk per decoded token."""

    def start(self) -> None:
        self.t0, self.marks = time.perf_counter(), []

    def tick(self) -> None:
        self.marks.append((time.perf_counter(), _io_read_bytes()))

    def summary(self, prompt_tokens: int) -> dict[str, Any]:
        (t1, io1), (tn, ion) = self.marks[0], self.marks[-1]
        n = len(self.marks)
        ttft = t1 - self.t0
        return {"ttft_s": ttft, "prefill_tok_s": prompt_tokens / ttft, "prompt_tokens": prompt_tokens, "new_tokens": n,
                "decode_tok_s": (n - 1) / (tn - t1) if n > 1 else 0.0,
                "disk_bytes_per_token": (ion - io1) / (n - 1) if n > 1 else 0.0}


def worker_main() -> int:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING)
    try:
        res = _worker(spec)
    except ImportError as e:
        res = {"error": f"not installed: {e}"}
    sys.stdout.write(RESULT_MARK + json.dumps(res) + "\n")
    return 0


def _run(spec: dict[str, Any], timeout_s: int, cgroup: MemoryCgroup | None = None) -> tuple[dict[str, Any], str]:
    return run_worker("sli.bench_scale", spec, timeout_s, wrap=cgroup.wrap if cgroup is not None else None)


def import_baseline(model: Path) -> int:
    """Anonymous memory of a process that has imported what every point imports."""
    code = ("import sys; from sli.bench import _import_everything; _import_everything(sys.argv[1]); "
            "from runtime.memory import anon_rss_bytes; print(anon_rss_bytes())")
    cp = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, check=True)
    return int(cp.stdout.split()[-1])


def _warm(paths: list[Path]) -> None:
    """Read files whole into the page cache (four reads in flight)."""
    for f in _files(paths):
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass


def make_q4_0(model: Path, out: Path, convert_script: Path) -> dict[str, Any]:
    """llama.cpp's own pipeline: its converter to a bf16 GGUF, its quantizer to Q4_0."""
    import llama_cpp

    bf16 = out.with_suffix(".bf16.gguf")
    env = dict(os.environ, PYTHONPATH=str(convert_script.parent / "gguf-py"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(convert_script), str(model), "--outtype", "bf16", "--outfile", str(bf16)],
                   check=True, capture_output=True, env=env)
    t1 = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = os.cpu_count()
    if llama_cpp.llama_model_quantize(str(bf16).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {bf16}")
    t2 = time.perf_counter()
    bf16.unlink()
    return {"convert_s": t1 - t0, "quantize_s": t2 - t1, "gguf_bytes": out.stat().st_size}


def run_scale(cfg: ScaleConfig, progress=logger.info) -> dict[str, Any]:
    """Run everything; returns the results (also written by :func:`write_scale_outputs`)."""
    from runtime.memory import parse_size
    from sli.offline.fetch import model_dir
    from sli.synthetic import SHAPES, bf16_bytes, write_model

    work = Path(cfg.workdir or Path(os.environ.get("SLI_HOME") or Path.home() / ".cache" / "sli") / f"scale-{cfg.shape}")
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"llama-{cfg.shape}-shape"
    made: list[Path] = []
    res: dict[str, Any] = {"config": asdict(cfg), "host": {"cpus": os.cpu_count()}, "quantize": {}, "points": []}
    shape = SHAPES[cfg.shape]
    need = 2.2 * bf16_bytes(shape, 49152)  # source, int4 and nf4 caches, the derived copy, a Q4_0 GGUF
    if not (model / "model.safetensors.index.json").exists():
        free = shutil.disk_usage(work).free
        if free < need:
            raise OSError(f"{work} has {free / 1e9:.1f} GB free; the {cfg.shape} scale run needs about {need / 1e9:.0f} GB")
        progress(f"writing the {cfg.shape} model to {model}")
        write_model(model, shape, vocab=49152, tokenizer_from=Path(cfg.tokenizer_from) if cfg.tokenizer_from else model_dir())
        made.append(model)
    src_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    res["host"]["model_bytes"] = src_bytes

    caches = {m: work / f"cache-{m}" for m in cfg.quantize_modes}
    for mode, cache in caches.items():
        if not (cache / "data.mdb").exists():
            made.append(cache)
        drop_caches([model])
        progress(f"quantizing to {mode}")
        q, err = _run({"kind": "quantize", "model": str(model), "mode": mode, "cache_dir": str(cache)}, cfg.timeout_s)
        q["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*.mdb"))
        res["quantize"][mode] = {**q, "error": err} if err else q
    int4 = caches.get("int4", work / "cache-int4")

    # the derived kernel copy is built by a first, short run (not measured)
    _run({"kind": "sli", "model": str(model), "mode": "int4", "cache_dir": str(int4), "budget": "1GB",
          "context_tokens": 64, "prompt_tokens": 8, "new_tokens": 2}, cfg.timeout_s)
    sli_files = [int4]
    shards = sorted(model.glob("*.safetensors"))
    progress("measuring the disk and memory")
    res["host"]["disk_read_1_stream_Bps"] = disk_read_speed(shards, streams=1)
    res["host"]["disk_read_4_streams_Bps"] = disk_read_speed(shards, streams=4)
    res["host"]["memory_read_Bps"] = memory_bandwidth()

    gguf = work / f"llama-{cfg.shape}-q4_0.gguf"
    if "llama.cpp" in cfg.peers and not gguf.exists() and cfg.llama_convert:
        progress("making llama.cpp's Q4_0 with its converter and quantizer")
        res["llama_cpp_quantize"] = make_q4_0(model, gguf, Path(cfg.llama_convert))
        made.append(gguf)
    if gguf.exists():
        res["host"]["gguf_bytes"] = gguf.stat().st_size
    peers = [p for p in cfg.peers if p != "llama.cpp" or gguf.exists()]
    if "llama.cpp" in peers:  # as shipped (weights repacked into anonymous memory) and from its mapped file
        peers.insert(peers.index("llama.cpp") + 1, LLAMA_MMAP)
    if "llama.cpp" in cfg.peers and not gguf.exists():
        res["notes"] = [f"llama.cpp skipped: no {gguf} and no --llama-convert (llama.cpp's convert_hf_to_gguf.py)"]
    files = {"sli": sli_files, "accelerate": shards, "llama.cpp": [gguf], LLAMA_MMAP: [gguf]}
    base = import_baseline(model)
    res["host"]["import_baseline_bytes"] = base
    ctx = cfg.prompt_tokens + cfg.new_tokens + 16

    def spec(system: str, budget: str, **extra) -> dict[str, Any]:
        common = {"model": str(model), "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens, "context_tokens": ctx}
        if system == "sli":
            if extra.get("batch"):  # short prompts, one KV reservation for the whole batch
                common["context_tokens"] = extra["batch"] * (96 + cfg.new_tokens)
            return {**common, "kind": "sli", "mode": "int4", "cache_dir": str(int4), "budget": budget, **extra}
        if system == "accelerate":
            return {**common, "kind": "accelerate", "budget_bytes": parse_size(budget)}
        return {**common, "kind": "llama.cpp", "gguf": str(gguf), "no_repack": system == LLAMA_MMAP}

    def point(system: str, budget: str, cg: MemoryCgroup | None, **extra) -> ScalePoint:
        if cg is not None:
            drop_caches(files[system])
            regime = f"cold, cgroup v{cg.version} limit {cg.limit_bytes >> 20} MiB"
        else:
            _warm(files[system])
            regime = "warm, no limit"
        progress(f"{system} at {budget}, {regime} {extra or ''}")
        r, err = _run(spec(system, budget, **extra), cfg.timeout_s, cg)
        if cg is not None and cg.peak_bytes() is not None:
            r["cgroup_peak_bytes"] = cg.peak_bytes()
        p = ScalePoint(system, budget, regime, r, err)
        p.result.update(extra)
        res["points"].append(asdict(p))
        return p

    def cgroup_for(budget: str) -> MemoryCgroup | None:
        limit = parse_size(budget) + base + CGROUP_MARGIN
        try:
            return MemoryCgroup(limit)
        except OSError as e:
            res.setdefault("notes", []).append(f"no hard limit at {budget}: {e}")
            return None

    for budget in cfg.budgets:
        cg = cgroup_for(budget)
        try:
            for system in ["sli", *peers]:
                if cg is not None:
                    point(system, budget, cg)
        finally:
            if cg is not None:
                cg.close()
        for system in ["sli", *peers]:
            point(system, budget, None)
    point("sli", "64GB", None)  # holds everything (the quantized model fits this host's RAM)
    mid = cfg.budgets[len(cfg.budgets) // 2]
    cg = cgroup_for(mid)
    try:
        point("sli", mid, cg, readahead=False)
        point("sli", mid, cg, readahead=True)
        for b in cfg.batch_sizes:
            point("sli", mid, cg, batch=b)
    finally:
        if cg is not None:
            cg.close()
    res["cgroup_margin_bytes"] = CGROUP_MARGIN
    if not cfg.keep:
        for p in made:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return res


# -- outputs ----------------------------------------------------------------------------------
def _touched_bytes(res: dict[str, Any], system: str) -> int:
    """Weight bytes one decode step reads from memory when everything is cached."""
    if system == "sli":
        # measured right after quantizing, before the derived kernel copy (the same size) exists
        return int(res["quantize"].get("int4", {}).get("cache_bytes") or 0)
    if system == "accelerate":
        return int(res["host"]["model_bytes"])
    return int(res.get("llama_cpp_quantize", {}).get("gguf_bytes") or res["host"].get("gguf_bytes") or 0)


def add_bounds(res: dict[str, Any]) -> None:
    """Each point's physical bound: bytes read from disk per token over the disk's speed with
    four reads in flight (cold), or weight bytes per token over memory bandwidth (warm)."""
    host = res["host"]
    for p in res["points"]:
        r = p["result"]
        if not r.get("decode_tok_s"):
            continue
        if p["regime"].startswith("cold") and r.get("disk_bytes_per_token"):
            bound = host["disk_read_4_streams_Bps"] / r["disk_bytes_per_token"]
        elif _touched_bytes(res, p["system"]):
            bound = host["memory_read_Bps"] / _touched_bytes(res, p["system"])
        else:
            continue
        r["bound_tok_s"] = bound
        r["share_of_bound"] = r["decode_tok_s"] * (r.get("batch") or 1) / bound if not r.get("batch") else None


def markdown(res: dict[str, Any]) -> str:
    h = res["host"]
    mb = lambda n: f"{n / 1e6:,.0f}" if n else "–"  # noqa: E731
    lines = [
        f"# Scale: {res['config']['shape']} model in real shapes, streamed on this host",
        "",
        f"Host: {h['cpus']} cores; disk {h['disk_read_1_stream_Bps'] / 1e9:.2f} GB/s cold with one read in flight, "
        f"{h['disk_read_4_streams_Bps'] / 1e9:.2f} GB/s with four; memory reads {h['memory_read_Bps'] / 1e9:.1f} GB/s; "
        f"import baseline {mb(h['import_baseline_bytes'])} MB of anonymous memory; bf16 source {h['model_bytes'] / 1e9:.2f} GB. "
        f"Cold points: files dropped from the page cache, then a memory cgroup limited to budget + import baseline + "
        f"{res['cgroup_margin_bytes'] >> 20} MiB (anonymous memory and page cache together). Warm points: files read into the page cache first, no limit.",
        "",
        "## Quantizing",
        "",
        "| mode | seconds | MB/s of bf16 input | peak anonymous MB | cache MB |",
        "|---|---|---|---|---|",
    ]
    for mode, q in res["quantize"].items():
        lines.append(f"| {mode} | {q.get('seconds', 0):.1f} | {q.get('MB_per_s', 0):.0f} | {mb(q.get('peak_anon_bytes'))} | {mb(q.get('cache_bytes'))} |")
    if "llama_cpp_quantize" in res:
        lq = res["llama_cpp_quantize"]
        lines.append(f"| llama.cpp Q4_0 (convert + quantize) | {lq['convert_s']:.0f} + {lq['quantize_s']:.0f} | "
                     f"{h['model_bytes'] / 1e6 / lq['quantize_s']:.0f} (quantize step) | – | {mb(lq['gguf_bytes'])} |")
    lines += ["", "## Decode, prefill and memory", "",
              "| system | budget | regime | decode tok/s | bound tok/s | of bound | first token s | prefill tok/s | disk MB/token | peak anon MB | cgroup peak MB | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        r = p["result"]
        extra = ", ".join(f"{k}={r[k]}" for k in ("readahead", "batch") if k in r)
        if "readahead_used" in r and "readahead" not in r:
            extra = ", ".join(x for x in (extra, f"read-ahead {'on' if r['readahead_used'] else 'off'} (auto)") if x)
        share = f"{r['share_of_bound']:.0%}" if r.get("share_of_bound") else "–"
        lines.append(
            f"| {p['system']} | {p['budget']} | {p['regime']} | {r.get('decode_tok_s', 0):.2f} | {r.get('bound_tok_s', 0):.2f} | {share} | "
            f"{r.get('ttft_s', 0):.1f} | {r.get('prefill_tok_s', 0):.1f} | {mb(r.get('disk_bytes_per_token'))} | "
            f"{mb(r.get('peak_anon_bytes'))} | {mb(r.get('cgroup_peak_bytes'))} | {p['error'] or extra} |")
    lines += ["", "## Ratios (decode tok/s)", "", "| budget | regime | sli / accelerate | sli / llama.cpp |", "|---|---|---|---|"]
    by = {}
    for p in res["points"]:
        if "readahead" in p["result"] or "batch" in p["result"]:
            continue
        by.setdefault((p["budget"], p["regime"].split(",")[0]), {})[p["system"]] = p["result"].get("decode_tok_s")
    for (budget, regime), d in by.items():
        s = d.get("sli")
        ratio = lambda k: f"{s / d[k]:.1f}x" if s and d.get(k) else "–"  # noqa: E731
        if "accelerate" in d or "llama.cpp" in d:
            lines.append(f"| {budget} | {regime} | {ratio('accelerate')} | {ratio('llama.cpp')} |")
    sli_tokens = [(p["budget"], p["regime"], p["result"]["tokens"]) for p in res["points"]
                  if p["system"] == "sli" and p["result"].get("tokens")]
    everything = [t for b, _, t in sli_tokens if b == "64GB"]
    if everything:
        same = [f"{b} {r.split(',')[0]}" for b, r, t in sli_tokens if t == everything[0]]
        differ = [f"{b} {r.split(',')[0]}" for b, r, t in sli_tokens if t != everything[0]]
        lines += ["", f"sli's tokens equal those of holding everything at {len(same)} of {len(sli_tokens)} points"
                  + (f"; they differ at: {', '.join(differ)}" if differ else " (every budget, cold in the cgroup and warm).")]
    for n in res.get("notes", []):
        lines += ["", f"Note: {n}"]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    from runtime.memory import parse_size

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for p in res["points"]:
        r = p["result"]
        if r.get("decode_tok_s") and "batch" not in r and "readahead" not in r and p["budget"] in res["config"]["budgets"]:
            series.setdefault(f"{p['system']} ({p['regime'].split(',')[0]})", []).append((parse_size(p["budget"]) / 1e9, r["decode_tok_s"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label, linestyle="--" if "warm" in label else "-")
    ax.set_xlabel("memory budget (GB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title(f"{res['config']['shape']} model: decode speed by budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def write_scale_outputs(res: dict[str, Any], out_dir: str) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    add_bounds(res)
    (out / "scale.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "scale.md").write_text(markdown(res))
    return {"json": str(out / "scale.json"), "md": str(out / "scale.md"), "png": plot(res, out / "scale.png")}
