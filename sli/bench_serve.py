"""`sli bench --serve`: `sli serve` under load beside llama.cpp's own OpenAI-compatible server.

For each model (the 1 B and 8 B random-shape models of the scale bench) and each number of
concurrent clients (1, 4, 16), one fresh server process is started cold (its files dropped
from the page cache) inside a memory cgroup whose limit is the budget plus the import
baseline plus :data:`~sli.bench_scale.CGROUP_MARGIN` (anonymous memory and page cache
together), as the scale bench runs its cold points. The clients are closed loops: each sends
its requests one after another, streaming, every request with a prompt of its own. Measured:
aggregate generated tokens per second (from the first request sent to the last token
received), time to first token and inter-token latency (p50, p99; the gaps between streamed
chunks), the server's peak anonymous memory (sampled from ``/proc/<pid>/status`` by this
process, finely, as only a benchmark may) and the cgroup's peak. Beside sli, in the same run
and under the same limit: ``llama-server`` with ``--parallel`` as many slots as clients, on
the same model's Q4_0 GGUF.

Outputs: ``serve.json``, ``serve.md`` and ``serve.png`` in the output folder.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sli.bench_scale import CGROUP_MARGIN, PROMPT_TEXT, MemoryCgroup, drop_caches, import_baseline

logger = logging.getLogger(__name__)

SERVED_NAME = "bench"


@dataclass
class ServeBenchConfig:
    shapes: tuple[str, ...] = ("1b", "8b")
    budgets: dict[str, str] = field(default_factory=lambda: {"1b": "400MB", "8b": "2GB", "real": "64MB"})
    clients: tuple[int, ...] = (1, 4, 16)
    requests_per_client: int = 2
    prompt_tokens: int = 64
    new_tokens: int = 16
    peers: tuple[str, ...] = ("llama-server",)  # as shipped and with --no-repack
    llama_server: str = ""  # default: $SLI_HOME/peers/llama.cpp/best/bin/llama-server
    out_dir: str = "docs/results"
    cold: bool = True  # files dropped from the page cache, the server inside a memory cgroup
    timeout_s: int = 3600


@dataclass
class ModelFiles:
    shape: str
    model: Path  # the HF folder (tokenizer, import baseline)
    sli_cache: Path  # int4 cache
    gguf: Path | None  # llama.cpp's Q4_0 of the same model


def _home() -> Path:
    return Path(os.environ.get("SLI_HOME") or Path.home() / ".cache" / "sli")


def model_files(shape: str) -> ModelFiles:
    """The scale bench's files for ``shape`` (``1b``, ``8b``), or the fetched real model (``real``)."""
    if shape == "real":
        from sli.offline.fetch import fetch_model, gguf_path

        return ModelFiles(shape, fetch_model(), _home() / "bench-serve" / "cache-real-int4", gguf_path())
    work = _home() / f"scale-{shape}"
    gguf = work / f"llama-{shape}-q4_0.gguf"
    return ModelFiles(shape, work / f"llama-{shape}-shape", work / "cache-int4", gguf if gguf.exists() else None)


# -- one server process ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started (optionally inside a cgroup) on loopback; ready once ``health_path`` answers 200.
    Always stopped by :meth:`stop` (SIGTERM, then SIGKILL after ``grace_s``)."""

    def __init__(self, cmd: list[str], port: int, *, wrap=None, health_path: str = "/health", timeout_s: float = 1800,
                 log_path: Path | None = None) -> None:
        self.port = port
        self.log_path = log_path
        out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self._out = out
        self.proc = subprocess.Popen(wrap(cmd) if wrap else cmd, stdout=out, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} before it was ready{self._tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server was not ready after {timeout_s:.0f} s{self._tail()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", health_path)
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)

    def _tail(self) -> str:
        if self.log_path and self.log_path.exists():
            return ":\n" + "".join(self.log_path.read_text(errors="replace").splitlines(True)[-15:])
        return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._out is not subprocess.DEVNULL:
            self._out.close()
        return self.proc.returncode


class AnonPeak:
    """The peak of a process's anonymous memory, sampled every ``interval`` s from ``/proc/<pid>/status``
    by a thread of this (the benchmark's) process."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        path = Path(f"/proc/{self.pid}/status")
        while not self._stop.is_set():
            try:
                for line in path.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(self.interval)

    def close(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


# -- clients ----------------------------------------------------------------------------------------
@dataclass
class RequestTiming:
    sent: float
    chunks: list[float]
    tokens: int
    error: str = ""


def stream_completion(port: int, body: dict[str, Any], timeout_s: float) -> RequestTiming:
    """POST /v1/completions with ``stream``; the arrival time of every streamed chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return RequestTiming(t0, [], 0, f"HTTP {r.status}: {r.read()[:300]!r}")
        chunks, tokens = [], 0
        for raw in r:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            now = time.perf_counter()
            for ch in obj.get("choices") or []:
                if ch.get("text") or ch.get("finish_reason") is None:  # a token (the last may come with the finish)
                    chunks.append(now)
            if obj.get("usage"):
                tokens = obj["usage"].get("completion_tokens", tokens)
        return RequestTiming(t0, chunks, tokens or len(chunks))
    except (OSError, ValueError) as e:
        return RequestTiming(t0, [], 0, f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def run_clients(port: int, prompts: list[list[int]], *, clients: int, per_client: int, new_tokens: int,
                timeout_s: float) -> tuple[list[RequestTiming], float]:
    """``clients`` closed-loop clients, each sending ``per_client`` requests one after another.
    Returns every request's timing and the wall time from the first request to the last token."""
    results: list[RequestTiming] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(per_client):
            body = {"model": SERVED_NAME, "prompt": prompts[k * per_client + j], "max_tokens": new_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            r = stream_completion(port, body, timeout_s)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = max((r.chunks[-1] for r in results if r.chunks), default=t0)
    return results, end - t0


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(xs), q))


def summarize(results: list[RequestTiming], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if not r.error and r.chunks]
    ttft = [r.chunks[0] - r.sent for r in ok]
    itl = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:])]
    tokens = sum(r.tokens for r in ok)
    return {"requests": len(results), "completed": len(ok), "errors": [r.error for r in results if r.error][:3],
            "tokens": tokens, "wall_s": wall_s, "tok_s": tokens / wall_s if wall_s > 0 else 0.0,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99)}


def prompts_for(model: Path, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens, each starting differently (no prefix is shared)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    text = PROMPT_TEXT * (length // 30 + 2)
    out = []
    for k in range(n):
        ids = tok(f"Request {k}: {text}")["input_ids"][:length]
        if len(ids) < length:
            raise ValueError(f"the prompt text gives {len(ids)} tokens, fewer than {length}")
        out.append(ids)
    return out


# -- the run ---------------------------------------------------------------------------------------
def _sli_cmd(files: ModelFiles, budget: str, ctx: int, port: int) -> list[str]:
    return [sys.executable, "-m", "sli.cli", "serve", str(files.sli_cache), "--mode", "int4", "--dtype", "bfloat16",
            "--memory-budget", budget, "--context-tokens", str(ctx), "--port", str(port), "--served-model-name", SERVED_NAME,
            "--max-waiting", "256"]


LLAMA = "llama-server"
LLAMA_MMAP = "llama-server --no-repack"  # weights stay in the mapped file, as sli's do, instead of repacked into anonymous memory


def _llama_cmd(binary: str, files: ModelFiles, clients: int, ctx: int, port: int, *, repack: bool) -> list[str]:
    return [binary, "-m", str(files.gguf), "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx), "--parallel",
            str(clients), "-t", str(os.cpu_count() or 1), "--alias", SERVED_NAME, "--no-webui", *([] if repack else ["--no-repack"])]


def ensure_sli_cache(files: ModelFiles, progress) -> None:
    """Quantize to int4 (in a process of its own) if the cache lacks it, then start the server
    once outside any limit so the derived kernel copy is built before anything is measured."""
    if not (files.sli_cache / "data.mdb").exists():
        progress(f"quantizing {files.model} to int4")
        subprocess.run([sys.executable, "-m", "sli.cli", "quantize", str(files.model), "--mode", "int4", "--cache", str(files.sli_cache)],
                       check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    ServerProcess(_sli_cmd(files, "64GB", 256, port), port).stop()


def run_point(system: str, files: ModelFiles, cfg: ServeBenchConfig, clients: int, prompts: list[list[int]],
              baseline: int, progress) -> dict[str, Any]:
    from runtime.memory import parse_size

    budget = cfg.budgets[files.shape]
    ctx = clients * (cfg.prompt_tokens + cfg.new_tokens + 16)
    port = free_port()
    cg = None
    point: dict[str, Any] = {"system": system, "shape": files.shape, "budget": budget, "clients": clients}
    if cfg.cold:
        drop_caches([files.sli_cache] if system == "sli" else [files.gguf])
        try:
            cg = MemoryCgroup(parse_size(budget) + baseline + CGROUP_MARGIN)
            point["cgroup_limit_bytes"] = cg.limit_bytes
        except OSError as e:
            point["note"] = f"no memory cgroup ({e}): run without a limit"
    cmd = (_sli_cmd(files, budget, ctx, port) if system == "sli"
           else _llama_cmd(cfg.llama_server, files, clients, ctx, port, repack=system == LLAMA))
    log = Path(cfg.out_dir) / f"serve-{system}-{files.shape}-{clients}.log"
    progress(f"{system} {files.shape} at {budget}, {clients} clients{' (cold, cgroup)' if cg else ''}")
    try:
        t_start = time.perf_counter()
        server = ServerProcess(cmd, port, wrap=cg.wrap if cg else None, timeout_s=cfg.timeout_s, log_path=log)
        point["startup_s"] = time.perf_counter() - t_start
        watch = AnonPeak(server.pid)
        try:
            results, wall = run_clients(port, prompts, clients=clients, per_client=cfg.requests_per_client,
                                        new_tokens=cfg.new_tokens, timeout_s=cfg.timeout_s)
            point.update(summarize(results, wall))
            if system == "sli":
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.request("GET", "/health")
                health = json.loads(c.getresponse().read())
                point["sli_baseline_anon_bytes"] = health["memory"]["baseline_anon_bytes"]
                point["engine"] = health["engine"]
        finally:
            point["peak_anon_bytes"] = watch.close()
            point["exit_status"] = server.stop()
        if system == "sli":
            point["peak_anon_over_baseline_bytes"] = point["peak_anon_bytes"] - point["sli_baseline_anon_bytes"]
        if cg is not None:
            point["cgroup_peak_bytes"] = cg.peak_bytes()
    except (RuntimeError, OSError) as e:
        point["error"] = str(e)[-600:]
    finally:
        if cg is not None:
            cg.close()
    return point


def run_serve_bench(cfg: ServeBenchConfig, progress=logger.info) -> dict[str, Any]:
    """Every point, each server in a fresh process; returns the results (see :func:`write_serve_outputs`)."""
    if not cfg.llama_server:
        cfg.llama_server = str(_home() / "peers" / "llama.cpp" / "best" / "bin" / "llama-server")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"config": asdict(cfg), "host": {"cpus": os.cpu_count()}, "points": [], "notes": []}
    for shape in cfg.shapes:
        files = model_files(shape)
        if not (files.model / "config.json").exists():
            res["notes"].append(f"{shape}: no model at {files.model} (make it with `sli bench --scale {shape} --keep`)")
            continue
        ensure_sli_cache(files, progress)
        baseline = import_baseline(files.model)
        res["host"][f"import_baseline_{shape}_bytes"] = baseline
        prompts = prompts_for(files.model, max(cfg.clients) * cfg.requests_per_client, cfg.prompt_tokens)
        systems = ["sli"]
        if LLAMA in cfg.peers:
            if files.gguf is None:
                res["notes"].append(f"{shape}: llama-server skipped, no Q4_0 GGUF beside the model")
            elif not Path(cfg.llama_server).exists():
                res["notes"].append(f"llama-server skipped: no binary at {cfg.llama_server}")
            else:
                systems += [LLAMA, LLAMA_MMAP]
        for clients in cfg.clients:
            for system in systems:
                res["points"].append(run_point(system, files, cfg, clients, prompts, baseline, progress))
    return res


# -- outputs ---------------------------------------------------------------------------------------
def _f(x, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    mb = lambda n: "–" if not n else f"{n / 1e6:,.0f}"  # noqa: E731
    lines = [
        "# Serving: `sli serve` under concurrent clients, beside llama.cpp's server",
        "",
        f"Host: {res['host']['cpus']} cores. Each point: a fresh server process"
        + (", started cold (files dropped from the page cache) inside a memory cgroup limited to budget + import baseline + "
           f"{CGROUP_MARGIN >> 20} MiB (anonymous memory and page cache together)" if cfg["cold"] else ", warm, no limit")
        + f". Closed-loop clients, {cfg['requests_per_client']} requests each, one after another, streaming; prompts of "
        f"{cfg['prompt_tokens']} tokens (no shared prefix), {cfg['new_tokens']} new tokens each (greedy, end-of-sequence ignored). "
        "sli: int4 (groups of 64, head and embeddings as int8 rows), bf16 compute, `--itl-factor 2`; llama.cpp: `llama-server --parallel <clients>` on the Q4_0 of "
        "the same model, as shipped (weights repacked into anonymous memory at load) and with `--no-repack` (weights used from "
        "the mapped file, as sli's are). Aggregate tok/s: generated tokens over the time from the first request to the last token. "
        "Inter-token latency (ITL): the gaps between a request's streamed chunks. Peak anon: the server's anonymous memory "
        "(sli: over its import baseline), sampled every 10 ms by the benchmark.",
        "",
        "| model | budget | system | clients | done | aggregate tok/s | TTFT p50 s | TTFT p99 s | ITL p50 s | ITL p99 s | "
        "peak anon MB | cgroup peak MB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in res["points"]:
        anon = p.get("peak_anon_over_baseline_bytes", p.get("peak_anon_bytes"))
        note = p.get("error") or p.get("note") or "; ".join(p.get("errors") or [])
        lines.append(
            f"| {p['shape']} | {p['budget']} | {p['system']} | {p['clients']} | {p.get('completed', 0)}/{p.get('requests', 0)} | "
            f"{_f(p.get('tok_s'))} | {_f(p.get('ttft_p50_s'), '{:.1f}')} | {_f(p.get('ttft_p99_s'), '{:.1f}')} | "
            f"{_f(p.get('itl_p50_s'))} | {_f(p.get('itl_p99_s'))} | {mb(anon)} | {mb(p.get('cgroup_peak_bytes'))} | "
            f"{note.replace('|', '/').replace(chr(10), ' ')[:160]} |")
    lines += ["", "## Goals (ratios from this run)", "",
              "| model | sli 16 / sli 1 (goal >= 8) | sli 16 / llama-server 16, its better variant (goal >= 3) | sli ITL p99 at 16 / ITL p50 at 1 (goal <= 2) |",
              "|---|---|---|---|"]
    for shape in cfg["shapes"]:
        pts = {(p["system"], p["clients"]): p for p in res["points"] if p["shape"] == shape and not p.get("error")}
        s1, s16 = pts.get(("sli", 1)), pts.get(("sli", 16))
        l16 = max((pts[k] for k in ((LLAMA, 16), (LLAMA_MMAP, 16)) if k in pts and pts[k].get("tok_s")),
                  key=lambda p: p["tok_s"], default=None)  # llama.cpp's better variant
        ratio = lambda a, b, k: f"{a[k] / b[k]:.2f}" if a and b and a.get(k) and b.get(k) else "–"  # noqa: E731
        itl = f"{s16['itl_p99_s'] / s1['itl_p50_s']:.2f}" if s1 and s16 and s1.get("itl_p50_s") and s16.get("itl_p99_s") else "–"
        lines.append(f"| {shape} | {ratio(s16, s1, 'tok_s')} | {ratio(s16, l16, 'tok_s')} | {itl} |")
    for n in res.get("notes", []):
        lines += ["", f"Note: {n}"]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> str:
    from sli.bench import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    series: dict[str, list[tuple[int, dict]]] = {}
    for p in res["points"]:
        if p.get("tok_s"):
            series.setdefault(f"{p['system']} {p['shape']} ({p['budget']})", []).append((p["clients"], p))
    for label, pts in sorted(series.items()):
        pts.sort(key=lambda x: x[0])
        style = "-" if label.startswith("sli") else "--"
        axes[0].plot([c for c, _ in pts], [p["tok_s"] for _, p in pts], style, marker="o", label=label)
        axes[1].plot([c for c, _ in pts], [p["itl_p99_s"] or 0 for _, p in pts], style, marker="o", label=label)
    for ax, ylabel in zip(axes, ("aggregate tokens/s", "inter-token latency p99 (s)")):
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("sli serve vs llama-server, cold under the same memory limit")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def write_serve_outputs(res: dict[str, Any], out_dir: str) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "serve.md").write_text(markdown(res))
    return {"json": str(out / "serve.json"), "md": str(out / "serve.md"), "png": plot(res, out / "serve.png")}
