"""`sli bench`: sli against its peers on one model, in one run, each point in its own process.

Every point runs in a fresh Python process, so its peak anonymous RSS (over a baseline
taken after imports) belongs to it alone. Points: transformers in memory (fp32, the dtype
sli computes in, and bf16), accelerate's disk offload at the same budget (the peers that come
with sli's dependencies), AirLLM when asked for, and sli at budgets of 100%, 50% and 25% of the bf16 model and at the minimum
its planner accepts, in each mode. Results go to JSON and a markdown table, with ratios
to each peer, and to a PNG plot of decode tokens/s against budget.

The I/O-bound limit of a point is this machine's measured read-and-decode throughput for
the variant divided by the bytes the point reads per token: how fast decode could go if
computing were free.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.manifest import layer_group

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Explain in a few sentences why the sky looks blue during the day and red at sunset."
DEFAULT_MODES = ("none", "int8", "nf4", "int4")
DEFAULT_FRACTIONS = (1.0, 0.5, 0.25)

# peer name -> (module it runs on, how to get it where it is missing)
PEERS = {
    "transformers": ("transformers", "it is one of sli's dependencies: pip install -e ."),
    "transformers-bf16": ("transformers", "it is one of sli's dependencies: pip install -e ."),
    "accelerate": ("accelerate", "it is one of sli's dependencies: pip install -e ."),
    "airllm": ("airllm", "AirLLM is not one of sli's dependencies; install it beside sli in an environment of its own "
               "(python -m venv ENV && ENV/bin/pip install -e '.[bench]' airllm) and run ENV/bin/sli bench"),
}
# the peers that come with sli's own dependencies; AirLLM runs when asked for (--peers ...,airllm)
DEFAULT_PEERS = ("transformers", "transformers-bf16", "accelerate")


@dataclass
class BenchConfig:
    model: str
    cache_dir: str
    out_dir: str
    prompt: str = DEFAULT_PROMPT
    new_tokens: int = 64
    modes: tuple[str, ...] = DEFAULT_MODES
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    with_minimum: bool = True
    peers: tuple[str, ...] = DEFAULT_PEERS
    plot: bool = True  # bench.png (needs matplotlib: pip install 'sli[bench]')
    offload_budget: str | None = None  # default: 25% of the bf16 model
    timeout_s: int = 900
    dtype: str = "bfloat16"  # sli's compute dtype (float32 is the exact-reference path)
    context_tokens: int = 256  # KV every sli point reserves, so budgets compare like with like


@dataclass
class Point:
    system: str
    mode: str
    budget_bytes: int | None
    label: str
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""


# -- workers (run in a child process) --------------------------------------------------------
def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from runtime.memory import PeakMemorySampler, release_free_memory

    torch.manual_seed(0)
    kind = spec["kind"]
    _import_everything(spec["model"])
    if kind == "sli":
        from sli.processor import UniversalSLIProcessor

        release_free_memory()
        with PeakMemorySampler() as mem:
            p = UniversalSLIProcessor(
                spec["model"],
                quantization_config=spec["mode"],
                cache_dir=spec["cache_dir"],
                memory_budget=spec["budget"],
                dtype=spec.get("dtype", "float32"),
                context_tokens=spec.get("context_tokens"),
                progress=False,
                spill_limit=0,  # no KV reused from an earlier point's prompt: every prefill computes
            )
            m = p.load()
            p.tokenizer
            r = p.generate(spec["prompt"], max_new_tokens=spec["new_tokens"], ignore_eos=True)
        s = r.stats
        return {
            "ttft_s": s.time_to_first_token_s,
            "decode_tok_s": s.decode_tokens_per_s,
            "bytes_per_token": s.bytes_read_per_token,
            "peak_rss_bytes": mem.peak_bytes,
            "new_tokens": s.new_tokens,
            "prompt_tokens": s.prompt_tokens,
            "plan": m.plan.describe(),
            "streamed_layers": len(m.plan.streamed_layers),
            "minimum_bytes": m.minimum_bytes,
            "full_bytes": m.full_bytes,
            "packed_int4": bool(m.packed),
            "dtype": spec.get("dtype", "float32"),
            "text": r.text,
            "read_decode_bytes_per_s": _read_decode_throughput(m),
        }
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    ids = tok(spec["prompt"], return_tensors="pt").input_ids
    release_free_memory()
    with PeakMemorySampler() as mem:
        if kind == "transformers":
            dtype = getattr(torch, spec.get("dtype", "float32"))
            model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).eval()
        elif kind == "accelerate":
            off = tempfile.mkdtemp(prefix="sli-bench-offload-")
            model = AutoModelForCausalLM.from_pretrained(
                spec["model"],
                dtype=torch.bfloat16,
                device_map="auto",
                max_memory={"cpu": int(spec["budget"])},
                offload_folder=off,
                offload_state_dict=True,
            ).eval()
        elif kind == "airllm":
            from airllm import AutoModel  # raises ImportError when absent

            # as shipped, on this machine's device; its per-layer shards go to a scratch folder
            shards = tempfile.mkdtemp(prefix="sli-bench-airllm-")
            model = AutoModel.from_pretrained(spec["model"], device="cpu", layer_shards_saving_path=shards)
        else:
            raise ValueError(kind)
        ttft, rate, n = _time_hf_generate(model, ids, spec["new_tokens"])
    return {
        "ttft_s": ttft,
        "decode_tok_s": rate,
        "bytes_per_token": None,
        "peak_rss_bytes": mem.peak_bytes,
        "new_tokens": n,
        "prompt_tokens": ids.shape[1],
    }


def _import_everything(model: str) -> None:
    """Import what a point will use before its baseline is taken: the baseline is "after
    imports", and transformers imports a model's modules lazily on first use."""
    import gc

    import accelerate  # noqa: F401

    from cache.codecs import _bnb_functional

    _bnb_functional()  # bitsandbytes, as the codecs import it (quietly)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from runtime.memory import release_free_memory

    cfg = AutoConfig.from_pretrained(model)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]  # imports the modeling module
    gc.collect()
    release_free_memory()


def _time_hf_generate(model, ids, new_tokens: int) -> tuple[float, float, int]:
    """Time to first token and decode tokens/s of transformers' greedy generate."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    return ttft, (n - 1) / max(total - ttft, 1e-9), n


def _read_decode_throughput(m) -> float:
    """Bytes of streamed records this machine reads, verifies and decodes per second: every
    streamed layer and head chunk once, through the same code the forward pass uses."""
    if not m.plan.streaming:
        return 0.0
    before = m.stats.bytes_read
    t0 = time.perf_counter()
    lo = m.loader
    for i in m.plan.streamed_layers:
        lo.decode_layer(i, lo.slots.take(i))
        lo.release_layer(i)
        m.stats.bytes_read += m._groups[layer_group(i)].stored_bytes
    if "head" in m.plan.streamed:
        e = m.head_entry
        for k in range(e.num_chunks):
            lo.apply_chunk(e, k, lambda w: None)
    seconds = time.perf_counter() - t0
    n = m.stats.bytes_read - before
    return n / seconds if seconds else 0.0


def worker_main() -> int:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING)
    try:
        res = _worker(spec)
        sys.stdout.write(RESULT_MARK + json.dumps(res) + "\n")  # the worker's reply to run_bench
        return 0
    except ImportError as e:
        sys.stdout.write(RESULT_MARK + json.dumps({"error": f"not installed: {e}"}) + "\n")
        return 0


# -- the driver -----------------------------------------------------------------------------
RESULT_MARK = "SLI-BENCH-RESULT "


def run_worker(module: str, spec: dict[str, Any], timeout_s: int, wrap=None) -> tuple[dict[str, Any], str]:
    """Run ``module.worker_main`` on ``spec`` in a fresh interpreter (through ``wrap(cmd)``,
    e.g. into a cgroup); returns (result, error)."""
    cmd = [sys.executable, "-c", f"import sys; from {module} import worker_main; sys.exit(worker_main())", json.dumps(spec)]
    if wrap is not None:
        cmd = wrap(cmd)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {}, f"timed out after {timeout_s}s"
    for line in cp.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            res = json.loads(line.split(" ", 1)[1])
            return (res, res.pop("error", "")) if "error" in res else (res, "")
    tail = (cp.stderr.strip().splitlines() or ["no output"])[-1]
    if cp.returncode < 0 or cp.returncode == 137:
        tail = f"died with signal {-cp.returncode if cp.returncode < 0 else 9} (9: out of memory under a limit): {tail}"
    return {}, tail


def _run_point(spec: dict[str, Any], timeout_s: int) -> tuple[dict[str, Any], str]:
    return run_worker("sli.bench", spec, timeout_s)


def check_setup(cfg: BenchConfig) -> None:
    """What the run needs, checked before it starts (a run takes minutes): every peer asked
    for, and matplotlib for the plot.

    Raises:
        ValueError: an unknown peer.
        ImportError: a peer or matplotlib is not installed; the message says how to get it.
    """
    import importlib.util

    unknown = [p for p in cfg.peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; sli bench knows {', '.join(PEERS)} (or none)")
    for peer in cfg.peers:
        module, how = PEERS[peer]
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"peer {peer!r} is not installed in {sys.executable}: {how}; or leave it out of --peers "
                              f"(the default peers: {','.join(DEFAULT_PEERS)})")
    if cfg.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise ImportError(f"sli bench draws bench.png with matplotlib, which is not installed ({e}): "
                              "pip install 'sli[bench]' (make bench does), or pass --no-plot") from e


def run_bench(cfg: BenchConfig, progress=None) -> list[Point]:
    """Run every point; returns them (also written by :func:`write_outputs`).

    Raises:
        ValueError, ImportError: what :func:`check_setup` finds, before anything runs.
    """
    from sli.offline.sources import open_source

    check_setup(cfg)

    src = open_source(cfg.model)
    bf16_bytes = sum(src.tensor_nbytes(n) for n in src.tensor_names())  # the source's own bytes (bf16 for the real model)
    src.close()
    points: list[Point] = []
    quarter = int(0.25 * bf16_bytes)
    offload = int(cfg.offload_budget) if cfg.offload_budget else quarter
    peers = []
    if "transformers" in cfg.peers:
        peers.append(Point("transformers", "fp32", None, "transformers in memory (fp32)"))
    if "transformers-bf16" in cfg.peers:
        peers.append(Point("transformers", "bf16", None, "transformers in memory (bf16)"))
    if "accelerate" in cfg.peers:
        peers.append(Point("accelerate", "bf16", offload, "accelerate disk offload"))
    if "airllm" in cfg.peers:
        peers.append(Point("airllm", "bf16", None, "AirLLM"))
    specs = []
    for p in peers:
        kind = p.system
        spec = {"kind": kind, "model": cfg.model, "prompt": cfg.prompt, "new_tokens": cfg.new_tokens}
        if kind == "transformers":
            spec["dtype"] = "float32" if p.mode == "fp32" else "bfloat16"
        if kind == "accelerate":
            spec["budget"] = offload
        specs.append((p, spec))
    for mode in cfg.modes:
        # make sure the variant exists before timing anything
        from sli.processor import UniversalSLIProcessor

        UniversalSLIProcessor(cfg.model, quantization_config=mode, cache_dir=cfg.cache_dir, progress=False).quantize()
        budgets = [(f"{int(f * 100)}%", int(f * bf16_bytes)) for f in cfg.fractions]
        if cfg.with_minimum:
            budgets.append(("min", None))
            budgets.insert(0, ("holds all", None))  # the least budget that keeps every weight resident
        for label, b in budgets:
            spec = {"kind": "sli", "model": cfg.model, "mode": mode, "cache_dir": cfg.cache_dir, "budget": b, "prompt": cfg.prompt,
                    "new_tokens": cfg.new_tokens, "dtype": cfg.dtype, "context_tokens": cfg.context_tokens}
            specs.append((Point("sli", mode, b, label), spec))
    minimum: dict[str, int] = {}
    full: dict[str, int] = {}
    # run the fixed budgets first: they tell the minimum and the all-resident budget of each mode
    specs.sort(key=lambda ps: ps[0].system == "sli" and ps[1]["budget"] is None)
    for p, spec in specs:
        if p.system == "sli" and spec["budget"] is None:
            spec["budget"] = (full if p.label == "holds all" else minimum).get(p.mode)
            if spec["budget"] is None:
                p.error = "budget unknown (no other point of this mode ran)"
                points.append(p)
                continue
            p.budget_bytes = spec["budget"]
        t0 = time.perf_counter()
        p.result, p.error = _run_point(spec, cfg.timeout_s)
        if p.system == "sli" and "minimum_bytes" in p.result:
            minimum.setdefault(p.mode, p.result["minimum_bytes"])
            full.setdefault(p.mode, p.result["full_bytes"])
        if p.error and "below the" in p.error and p.system == "sli":
            p.error = "budget below this mode's minimum"
        logger.info("%s %s %s: %s (%.0fs)", p.system, p.mode, p.label, p.error or f"{p.result.get('decode_tok_s', 0):.2f} tok/s", time.perf_counter() - t0)
        if progress:
            progress(p)
        points.append(p)
    # peers first (in run order: the sort is stable), then each mode from the largest budget down
    points.sort(key=lambda p: (p.system == "sli", cfg.modes.index(p.mode) if p.system == "sli" else 0, -(p.budget_bytes or 0)))
    _add_ratios(points)
    return points


def _add_ratios(points: list[Point]) -> None:
    peers = {p.label: p.result.get("decode_tok_s") for p in points if p.system != "sli" and p.result.get("decode_tok_s")}
    for p in points:
        r = p.result
        if p.system != "sli" or not r.get("decode_tok_s"):
            continue
        r["ratios"] = {label: r["decode_tok_s"] / v for label, v in peers.items()}
        thr, bpt = r.get("read_decode_bytes_per_s") or 0, r.get("bytes_per_token") or 0
        if thr and bpt:
            r["io_bound_tok_s"] = thr / bpt
            r["share_of_io_bound"] = r["decode_tok_s"] / r["io_bound_tok_s"]


def write_outputs(points: list[Point], cfg: BenchConfig) -> dict[str, str]:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "model": cfg.model,
        "prompt": cfg.prompt,
        "new_tokens": cfg.new_tokens,
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "points": [p.__dict__ for p in points],
    }
    (out / "bench.json").write_text(json.dumps(data, indent=2, default=str))
    (out / "bench.md").write_text(markdown_table(points))
    paths = {"json": str(out / "bench.json"), "markdown": str(out / "bench.md")}
    if cfg.plot:  # matplotlib was checked before the run (check_setup)
        paths["png"] = plot(points, out / "bench.png")
    return paths


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.0f}"


def markdown_table(points: list[Point]) -> str:
    peer_labels = [p.label for p in points if p.system != "sli" and p.result.get("decode_tok_s")]
    head = ["system", "mode", "budget", "budget MB", "TTFT s", "decode tok/s", "MB read/token", "peak anon MB", "I/O-bound tok/s", "share of I/O bound"]
    head += [f"x {lbl}" for lbl in peer_labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        r = p.result
        if p.error:
            row = [p.system, p.mode, p.label, _mb(p.budget_bytes), p.error] + [""] * (len(head) - 5)
        else:
            row = [
                p.system, p.mode, p.label, _mb(p.budget_bytes), f"{r['ttft_s']:.2f}", f"{r['decode_tok_s']:.2f}",
                "-" if r.get("bytes_per_token") is None else f"{r['bytes_per_token'] / 1e6:.1f}",
                f"{r['peak_rss_bytes'] / 1e6:.0f}",
                f"{r['io_bound_tok_s']:.1f}" if r.get("io_bound_tok_s") else "-",
                f"{r['share_of_io_bound']:.0%}" if r.get("share_of_io_bound") else "-",
            ]
            row += [f"{r['ratios'][lbl]:.2f}" if r.get("ratios") and lbl in r["ratios"] else "" for lbl in peer_labels]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or an ImportError that says how to get it
    (every benchmark's plot comes through here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # a missing plotting library is said, not skipped
        raise ImportError(f"the plot needs matplotlib ({e}); install it with pip install 'sli[bench]'") from e
    return plt


def plot(points: list[Point], path: Path) -> str:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5))
    for mode in sorted({p.mode for p in points if p.system == "sli"}):
        pts = sorted((p.budget_bytes / 1e6, p.result["decode_tok_s"]) for p in points if p.system == "sli" and p.mode == mode and not p.error)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"sli {mode}")
    peer_styles = iter([("black", "--"), ("gray", ":"), ("purple", "-."), ("brown", "--")])
    for p in points:
        if p.system == "sli" or p.error:
            continue
        color, style = next(peer_styles, ("black", "--"))
        if p.budget_bytes:
            ax.scatter([p.budget_bytes / 1e6], [p.result["decode_tok_s"]], marker="s", s=60, color=color, label=p.label, zorder=3)
        else:
            ax.axhline(p.result["decode_tok_s"], linestyle=style, color=color, linewidth=1, label=p.label)
    ax.set_xscale("log")
    ax.set_xlabel("memory budget (MB, log)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("decode speed against memory budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
