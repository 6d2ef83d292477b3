"""The `sli` command line: fetch-model, quantize, inspect."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections import Counter
from pathlib import Path

from cache.errors import CacheError
from runtime.pipeline.world import PipelineError
from cache.store import LayerStore
from runtime.arch import UnsupportedArchitectureError
from runtime.cuda import CudaUnavailableError
from runtime.kernels import KernelError
from sli.offline.adaptive import AdaptiveQuantizer
from sli.offline.calibration import CalibrationConfig, CalibrationMethod
from sli.offline.config import ChannelOrder, QuantizationConfig, QuantizationMode
from sli.offline.sources import ModelSourceError
from sli.server import DEFAULT_MAX_BODY_BYTES

_DEFAULTS = QuantizationConfig(mode=QuantizationMode.NF4)
# the calibration defaults, from the dataclass (an instance would hash the default text at import)
_CAL = {f.name: f.default for f in dataclasses.fields(CalibrationConfig)}


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model layer by layer into a cache")
    p.add_argument("model", help="model folder, .gguf file, or SmolLM2-135M-Instruct (after `sli fetch-model`)")
    p.add_argument("--mode", choices=[m.value for m in QuantizationMode], default=None,
                   help=f"how weights are stored (default {_DEFAULTS.mode.value}; a cache directory given as the model: what it holds)")
    p.add_argument("--cache", default=None, help="cache directory (default $SLI_HOME/cache)")
    p.add_argument("--mixed", action="store_true", help="mixed precision: attention INT8, FFN NF4, others kept")
    p.add_argument(
        "--skip",
        default=None,
        help="comma-separated modules kept unquantized (default: none; the head and token embeddings are stored as int8 "
             "rows, see --vocab-mode; 'lm_head,embed_tokens' keeps them in 16 bits)",
    )
    p.add_argument("--compute-dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"],
                   help="the plan's compute dtype (overrides the processor's --dtype; the two given at once must agree)")
    p.add_argument("--group-size", type=int, default=_DEFAULTS.group_size,
                   help="int4/int3/int2 group size (a width that is not a multiple of it ends in one narrower group)")
    p.add_argument("--vocab-mode", choices=["int8", "int4", "none"], default=None,
                   help="how the head and token embeddings are stored, as rows (default: int8 in every quantized mode)")
    p.add_argument("--symmetric", action="store_true", help="int4/int3/int2: symmetric grid (default: asymmetric, integer zero point)")
    p.add_argument("--permute", choices=[o.value for o in ChannelOrder], default=None,
                   help="int4/int3/int2: order input channels before grouping, by weight L2 norm or calibration activation scale")
    p.add_argument("--calibrate", choices=[m.value for m in CalibrationMethod], default=None,
                   help="calibrated quantization: GPTQ, AWQ scales folded into the model, both (layer by layer), or rtn "
                        "(round to nearest on grids weighted by each input channel's importance); all of them choose "
                        "each group's grid by that importance")
    p.add_argument("--calibration-text", default=None,
                   help="calibration text: plain text, or JSONL with a 'text' field (default: stdlib docstrings shipped with sli)")
    p.add_argument("--calibration-samples", type=int, default=_CAL["samples"], help="calibration sequences")
    p.add_argument("--calibration-seqlen", type=int, default=_CAL["seqlen"], help="tokens per calibration sequence")
    p.add_argument("--calibration-holdout", type=int, default=_CAL["holdout_tokens"],
                   help="tokens at the end of the calibration text that no sample sees, on which --target-loss is measured "
                        "(0: 4096)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: columns by decreasing activation energy, groups kept static (default: on)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="percent perplexity loss allowed on a held-out slice of the calibration text: each tensor gets the "
                        "fewest bits (calibrated int3/int4 groups, int8, or kept) that stay under it")
    p.add_argument("--threshold", type=float, default=_DEFAULTS.llm_int8_threshold, help="int8 outlier threshold")
    p.add_argument("--no-double-quant", action="store_true", help="nf4/fp4: no double quantization")
    p.add_argument("--target-bits", type=float, default=None,
                   help="mixed precision chosen by measured salience, to this many bits per weight counted over every "
                        "parameter (embeddings, head, norms) from the cache's stored bytes, as a GGUF file's size is (e.g. 4.5)")
    p.add_argument("--compress-level", type=int, default=3, help="zstd level, 0 disables")
    p.add_argument("--memory-budget", default=None,
                   help="calibration: activations that do not fit spill to the cache directory (e.g. 2GiB, or auto)")
    p.add_argument("--validate-memory", action="store_true", help="fail unless every quantized tensor shrank; report the reduction")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (bits_per_weight: the stored bytes over every parameter, embeddings, head and norms included)")


def _calibration_from_args(a: argparse.Namespace) -> CalibrationConfig | None:
    """The calibration the options ask for. ``--target-loss`` and ``--target-bits`` calibrate
    too: given a text, samples or seqlen without ``--calibrate``, they measure on those with
    GPTQ's statistics (a loss target also holds out the end of that text to measure on)."""
    method = getattr(a, "calibrate", None)
    if method is None:
        given = [flag for flag, on in (("--calibration-text", a.calibration_text is not None), ("--act-order", a.act_order is not None),
                                       ("--calibration-samples", a.calibration_samples != _CAL["samples"]),
                                       ("--calibration-seqlen", a.calibration_seqlen != _CAL["seqlen"]),
                                       ("--calibration-holdout", a.calibration_holdout != _CAL["holdout_tokens"])) if on]
        if not given:
            return None
        if getattr(a, "target_loss", None) is None and getattr(a, "target_bits", None) is None:
            raise ValueError(f"{given[0]} applies to calibrated quantization: add --calibrate gptq (or awq, awq+gptq, rtn), "
                             "or plan with --target-loss / --target-bits, which calibrate on it")
        method = CalibrationMethod.GPTQ.value
    return CalibrationConfig(method=method, text=a.calibration_text, samples=a.calibration_samples,
                             seqlen=a.calibration_seqlen, holdout_tokens=a.calibration_holdout,
                             act_order=_CAL["act_order"] if a.act_order is None else a.act_order)


def _plan_given(a: argparse.Namespace) -> bool:
    """Whether the command line says how to quantize (else a cache directory opens what it holds)."""
    return bool(a.mode or a.mixed or getattr(a, "calibrate", None) or getattr(a, "target_bits", None)
                or getattr(a, "target_loss", None) or a.skip is not None or a.symmetric or a.permute or a.vocab_mode)


def _plan_from_args(a: argparse.Namespace) -> QuantizationConfig | AdaptiveQuantizer:
    skip = None if a.skip is None else [s for s in a.skip.split(",") if s.strip()]
    calibration = _calibration_from_args(a)
    if a.mixed:
        return AdaptiveQuantizer(
            base_config=QuantizationConfig(mode=QuantizationMode.NF4, vocab_mode=a.vocab_mode),
            attention_config=QuantizationConfig(mode=QuantizationMode.INT8),
            skip_modules=skip,
            compute_dtype=a.compute_dtype,
            calibration=calibration,
        )
    return QuantizationConfig(
        mode=QuantizationMode(a.mode or _DEFAULTS.mode.value),
        compute_dtype=a.compute_dtype,
        double_quant=not a.no_double_quant,
        llm_int8_threshold=a.threshold,
        llm_int8_skip_modules=skip,
        group_size=a.group_size,
        symmetric=a.symmetric,
        permute=a.permute or "none",
        calibration=calibration,
        vocab_mode=a.vocab_mode,
    )


def cmd_quantize(a: argparse.Namespace) -> int:
    proc = _processor(a, compress_level=a.compress_level, progress=True, memory_budget=a.memory_budget)
    report = proc.quantize(validate_memory=a.validate_memory)
    s = report.summary()
    sp = getattr(proc, "salience", None)
    if sp is not None and sp.target_loss is not None:
        # what the plan measured, and what the built cache measures on the same held-out text
        s["target_loss_pct"] = sp.target_loss
        s["planned_loss_pct"] = round(sp.loss, 3)
        s["heldout_loss_pct"] = round(sp.built_loss if sp.built_loss is not None else proc.heldout_loss(), 3)
        s["planned_bits_per_weight"] = round(sp.bits_all, 3)
        s["plan"] = sp.counts()
    if a.json:
        print(json.dumps(s, indent=2))
        return 0
    for k, v in s.items():
        print(f"{k:>22}: {v}")
    if a.validate_memory:
        print(f"memory: {s['original_MB']} MB -> {s['cache_MB']} MB on disk, reduction factor {s['reduction_factor']}x")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from runtime.generate import GenerationOutput, SamplingConfig, check_stop
    from runtime.memory import format_size

    options = dict(do_sample=a.temperature > 0, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,  # 0 = greedy
                   repetition_penalty=a.repetition_penalty, seed=a.seed)
    SamplingConfig(max_new_tokens=a.max_new_tokens, **options)  # the checks every entry point makes, before anything loads
    check_stop(a.stop)
    proc = _processor(a, memory_budget=a.memory_budget, dtype=a.dtype, prefetch=a.prefetch, device=a.device, gpu_budget=a.gpu_budget,
                      kv_dtype=a.kv_dtype, pipeline=_pipeline_from_args(a))
    model = proc.load()  # quantize if needed and open, before echoing the prompt
    if _is_stage_worker(model):  # another rank of a pipeline: run its stage until rank 0 is done; print nothing
        return model.run()
    proc.prefix_session()  # the KV pool and its spill store: what they say comes before the prompt too
    out = GenerationOutput()
    pieces = proc.stream(a.prompt, max_new_tokens=a.max_new_tokens, stop=a.stop, out=out, speculative=a.speculative,
                         draft=a.draft, **options)
    print(a.prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    s = out.stats
    print(
        f"\n[{model.describe() if hasattr(model, 'describe') else model.plan.describe()}]\n"
        f"[prompt {s.prompt_tokens} tokens, {s.new_tokens} new; first token {s.time_to_first_token_s:.2f}s; "
        f"prefill {s.prefill_tokens_per_s:.1f} tok/s; decode {s.decode_tokens_per_s:.2f} tok/s; "
        f"{format_size(s.bytes_read_per_token)} read per token; peak +{format_size(s.peak_rss_bytes)} during generation"
        f"{_speculation(s, a.speculative)}]",
        file=sys.stderr,
    )
    proc.close()
    return 0


def _speculation(s, speculative: str | None) -> str:
    return f"; {s.tokens_per_pass:.2f} tokens per pass, {s.acceptance:.0%} of {s.drafted_tokens} drafted kept" if speculative else ""


def _add_speculative(p: argparse.ArgumentParser) -> None:
    from runtime.speculative import Speculative

    p.add_argument("--speculative", default=None, choices=[m.value for m in Speculative],
                   help="verify several drafted tokens per pass over the streamed layers (the same tokens as plain decoding): "
                        "lookup (n-grams of the prompt and the text so far, no extra weights) or draft (--draft)")
    p.add_argument("--draft", default=None,
                   help="--speculative draft: a small model with the same tokenizer (folder or cache), or a plan name "
                        "(e.g. int4) for the model's own variant; held resident beside the budget")


def cmd_chat(a: argparse.Namespace) -> int:
    """Interactive chat: streams answers; /reset, /stats, /exit; Ctrl-C stops an answer."""
    from runtime.memory import format_size

    proc = _processor(a, memory_budget=a.memory_budget, dtype=a.dtype, context_tokens=a.context_tokens, kv_dtype=a.kv_dtype)
    session = proc.chat(system_prompt=a.system)
    print(f"[{proc.load().plan.describe()}]", file=sys.stderr)
    print("sli chat: /reset clears the history, /stats shows the last answer's figures, /exit quits; Ctrl-C stops an answer.",
          flush=True)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                session.reset()
                print("[history cleared]", flush=True)
                continue
            if cmd == "/stats":
                s = session.last.stats if session.last else None
                if s is None:
                    print("[no answer yet]", flush=True)
                else:
                    print(
                        f"[time to first token {s.time_to_first_token_s:.2f}s; decode {s.decode_tokens_per_s:.2f} tok/s; "
                        f"prompt {s.prompt_tokens} tokens, {s.cached_tokens} cached ({s.disk_cached_tokens} from disk), "
                        f"{s.prefill_tokens} prefilled; {s.new_tokens} new; peak +{format_size(s.peak_rss_bytes)}{_speculation(s, a.speculative)}]",
                        flush=True,
                    )
                continue
            print("bot> ", end="", flush=True)
            gen = session.stream(cmd, max_new_tokens=a.max_new_tokens, speculative=a.speculative, draft=a.draft)
            try:
                for piece in gen:
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:
                gen.close()
                print(" [stopped]", end="")
            except (ValueError, RuntimeError, CacheError) as e:  # this turn failed; the history is as before it
                print(f"[error: {e}]", end="")
            print(flush=True)
    finally:
        proc.close()


def cmd_serve(a: argparse.Namespace) -> int:
    """An OpenAI-compatible server on loopback (unless --host says otherwise) until SIGTERM."""
    import ipaddress

    from runtime.engine import EngineConfig
    from sli.server import serve

    try:
        loopback = ipaddress.ip_address(a.host).is_loopback
    except ValueError:
        loopback = a.host == "localhost"
    if not loopback and not a.api_key:
        print(f"sli serve: warning: listening on {a.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    config = EngineConfig(max_running=a.max_running, max_waiting=a.max_waiting, step_tokens=a.step_tokens,
                          itl_factor=a.itl_factor or None)
    proc = _processor(a, memory_budget=a.memory_budget, dtype=a.dtype, context_tokens=a.context_tokens, kv_dtype=a.kv_dtype,
                      pipeline=_pipeline_from_args(a))
    if proc.pipeline is not None and int(os.environ.get("RANK", "0")) != 0:
        try:  # another rank of a pipeline: run its stage until rank 0 stops
            return proc.load().run()
        finally:
            proc.close()
    try:
        return serve(proc, host=a.host, port=a.port, api_key=a.api_key or None, model_name=a.served_model_name,
                     engine_config=config, shutdown_timeout_s=a.shutdown_timeout, max_body_bytes=a.max_body_bytes,
                     ready=lambda url: print(f"sli serve: listening on {url}", file=sys.stderr, flush=True))
    finally:
        proc.close()


def cmd_validate(a: argparse.Namespace) -> int:
    from sli.validate import describe_model, validate

    if a.model_path:
        info = describe_model(a.model_path)
        print(json.dumps(info, indent=2))
        return 0
    if not a.model:
        raise SystemExit("sli validate: give MODEL_OR_CACHE, or --model-path to check a model folder or file")
    proc = _processor(a, memory_budget=a.memory_budget, dtype=a.dtype)
    text, name = None, "pydoc_data topics"
    if a.text:
        with open(a.text, encoding="utf-8") as f:
            text, name = f.read(), a.text
    r = validate(proc, text=text, text_name=name, max_tokens=a.max_tokens, max_length=a.max_length,
                 max_accuracy_loss_pct=a.max_accuracy_loss)
    proc.close()
    d = r.to_dict()
    if a.report:
        with open(a.report, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2)
    print(json.dumps(d, indent=2))
    if r.passed is False:
        print(f"FAIL: perplexity rose {r.perplexity_delta_pct:.2f}%, above the allowed {a.max_accuracy_loss}%", file=sys.stderr)
        return 1
    return 0


def _scale_options(cfg, a: argparse.Namespace):
    """The options the scale and fits benchmarks share: tokens decoded, prompt length, peers."""
    if a.new_tokens_scale:
        cfg.new_tokens = a.new_tokens_scale
    if a.prompt_tokens:
        cfg.prompt_tokens = a.prompt_tokens
    if a.peers is not None:
        cfg.peers = tuple(x for x in a.peers.split(",") if x)
    return cfg


def cmd_bench_fits(a: argparse.Namespace) -> int:
    from sli.bench_fits import FitsConfig, run_fits, write_fits_outputs

    cfg = _scale_options(FitsConfig(shape=a.scale, workdir=a.workdir or "", out_dir=a.out if a.out != "bench-results" else "docs/results",
                                    limits=tuple(x for x in a.limits.split(",") if x)), a)
    res = run_fits(cfg, progress=lambda m: print(f"[fits] {m}", file=sys.stderr, flush=True))
    paths = write_fits_outputs(res, cfg.out_dir)
    print(open(paths["md"]).read())
    return 0


def cmd_bench_scale(a: argparse.Namespace) -> int:
    from sli.bench_scale import ScaleConfig, run_scale, write_scale_outputs

    if a.limits:
        return cmd_bench_fits(a)

    cfg = ScaleConfig(shape=a.scale, workdir=a.workdir or "", out_dir=a.out if a.out != "bench-results" else "docs/results",
                      llama_convert=a.llama_convert or "", keep=a.keep)
    if a.budgets:
        cfg.budgets = tuple(a.budgets.split(","))
    res = run_scale(_scale_options(cfg, a), progress=lambda m: print(f"[scale] {m}", file=sys.stderr, flush=True))
    paths = write_scale_outputs(res, cfg.out_dir)
    print(open(paths["md"]).read())
    return 0


def cmd_bench_serve(a: argparse.Namespace) -> int:
    from sli.bench_serve import ServeBenchConfig, run_serve_bench, write_serve_outputs

    cfg = ServeBenchConfig(out_dir=a.out if a.out != "bench-results" else "docs/results", cold=not a.warm)
    if a.shapes:
        cfg.shapes = tuple(x for x in a.shapes.split(",") if x)
    if a.clients:
        cfg.clients = tuple(int(x) for x in a.clients.split(","))
    if a.budgets:
        cfg.budgets.update(dict(kv.split("=", 1) for kv in a.budgets.split(",")))
    if a.requests_per_client:
        cfg.requests_per_client = a.requests_per_client
    if a.prompt_tokens:
        cfg.prompt_tokens = a.prompt_tokens
    if a.new_tokens_scale:
        cfg.new_tokens = a.new_tokens_scale
    if a.llama_server:
        cfg.llama_server = a.llama_server
    res = run_serve_bench(cfg, progress=lambda m: print(f"[serve] {m}", file=sys.stderr, flush=True))
    paths = write_serve_outputs(res, cfg.out_dir)
    print(open(paths["md"]).read())
    return 0


def cmd_bench_quality(a: argparse.Namespace) -> int:
    from sli.bench_quality import QualityBenchConfig, label, run_quality, write_outputs
    from sli.offline.fetch import resolve_model, sli_home

    cfg = QualityBenchConfig(model=str(resolve_model(a.model)), out_dir=a.out if a.out != "bench-results" else "docs/results",
                             work_dir=a.workdir or "", samples=a.calibration_samples, seqlen=a.calibration_seqlen,
                             eval_tokens=a.eval_tokens, target_loss=a.bench_target_loss or None)
    if a.grid is not None:
        cfg.grid = tuple(x for x in a.grid.split(",") if x)
    if a.methods is not None:
        cfg.methods = tuple(x for x in a.methods.split(",") if x)
    if a.quality_peers is not None:
        cfg.peers = tuple(x for x in a.quality_peers.split(",") if x)
    if a.scale_model != "none":
        default = sli_home() / "scale-1b" / "llama-1b-shape"
        cfg.scale_model = a.scale_model or (str(default) if default.is_dir() else "")
        if not cfg.scale_model:
            print(f"[quality] no 1 B model at {default}: the time and memory points are left out (--scale-model PATH)", file=sys.stderr)
    cfg.scale_samples = a.scale_samples

    def show(row) -> None:
        msg = row.get("error") or f"perplexity {row.get('perplexity', float('nan')):.4f}, {row.get('seconds', 0):.0f}s"
        print(f"[quality] {label(row)}: {msg}", file=sys.stderr, flush=True)

    rows = run_quality(cfg, progress=show)
    paths = write_outputs(rows, cfg)
    print(open(paths["markdown"]).read())
    return 0


def cmd_bench_pipeline(a: argparse.Namespace) -> int:
    from sli.bench_pipeline import PipelineBenchConfig, run_pipeline_bench, write_outputs

    cfg = PipelineBenchConfig(out_dir=a.out if a.out != "bench-results" else "docs/results")
    if a.shapes:
        cfg.shapes = tuple(x for x in a.shapes.split(",") if x)
    if a.splits:  # 8b=4x2GB,1b=2x400MB
        for item in a.splits.split(","):
            shape, _, rest = item.partition("=")
            n, _, budget = rest.partition("x")
            cfg.splits[shape] = (int(n), budget)
    unknown = [s for s in cfg.shapes if s not in cfg.splits]
    if unknown:
        raise ValueError(f"--pipeline: no split for {unknown}; give --splits SHAPE=RANKSxBUDGET")
    if a.clients:
        cfg.batch_sizes = tuple(int(x) for x in a.clients.split(","))
    if a.new_tokens_scale:
        cfg.new_tokens = a.new_tokens_scale
    if a.workdir:
        cfg.workdir = a.workdir
    res = run_pipeline_bench(cfg, progress=lambda m: print(f"[bench --pipeline] {m}", file=sys.stderr, flush=True))
    paths = write_outputs(res, cfg.out_dir)
    print(Path(paths["markdown"]).read_text())
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from sli.bench import BenchConfig, run_bench, write_outputs
    from sli.offline.fetch import resolve_model, sli_home

    if a.scale:
        return cmd_bench_scale(a)
    if a.serve:
        return cmd_bench_serve(a)
    if a.quality:
        return cmd_bench_quality(a)
    if a.pipeline:
        return cmd_bench_pipeline(a)

    cfg = BenchConfig(
        model=str(resolve_model(a.model)),
        cache_dir=a.cache or str(sli_home() / "cache"),
        out_dir=a.out,
        new_tokens=a.new_tokens,
        modes=tuple(x for x in a.modes.split(",") if x),
        dtype=a.dtype,
        plot=not a.no_plot,
    )
    if a.peers is not None:  # "none": sli alone
        cfg.peers = tuple(x for x in a.peers.split(",") if x and x != "none")
    if a.prompt:
        cfg.prompt = a.prompt

    def show(p) -> None:
        r = p.result
        msg = p.error or f"{r['decode_tok_s']:.2f} tok/s, TTFT {r['ttft_s']:.2f}s, peak {r['peak_rss_bytes'] / 1e6:.0f} MB"
        print(f"{p.system:>12} {p.mode:>5} {p.label:>28}: {msg}", file=sys.stderr, flush=True)

    points = run_bench(cfg, progress=show)
    paths = write_outputs(points, cfg)
    print(open(paths["markdown"]).read())
    print("\n".join(f"{k}: {v}" for k, v in paths.items()), file=sys.stderr)
    return 0


def cmd_fetch(a: argparse.Namespace) -> int:
    from sli.offline.fetch import fetch_model, gguf_path

    path = fetch_model()
    print(path)
    if a.gguf:
        print(gguf_path())
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    with LayerStore(a.cache, readonly=True) as store:
        variants = store.list_variants()
        if a.variant:
            variants = [v for v in variants if v.startswith(a.variant)]
        if not variants:
            print(f"{a.cache}: no complete variant" + (f" matching {a.variant}" if a.variant else ""))
            return 1
        for vid in variants:
            m = store.require_manifest(vid)
            q = m.quantization
            mode = q.get("mode") if q.get("kind") == "config" else "mixed"
            params = sum(math.prod(t.shape) for t in m.tensors().values())
            print(f"variant {vid}  model={m.source['path']} ({m.model_type}, {m.source['format']})  mode={mode}")
            print(
                f"  {params / 1e6:.1f}M params  original {m.original_bytes / 1e6:.1f} MB  cache {m.stored_bytes / 1e6:.1f} MB  "
                f"reduction {m.original_bytes / max(m.stored_bytes, 1):.2f}x  {8 * m.stored_bytes / max(params, 1):.2f} bits/weight (all parameters, stored bytes)  "
                f"zstd {m.raw_bytes / max(m.stored_bytes, 1):.3f}x  built in {m.seconds:.1f}s by sli {m.library_version}"
            )
            for line in _calibration_lines(m):
                print(f"  {line}")
            print(f"  {'group':<10} {'orig MB':>8} {'raw MB':>8} {'disk MB':>8} {'zstd':>6} {'mean relMSE':>12}  codecs")
            for g in m.groups:
                q_errs = [t.rel_mse for t in g.tensors if t.codec != "raw"]
                codecs = Counter(t.codec for t in g.tensors)
                print(
                    f"  {g.name:<10} {g.original_bytes / 1e6:8.2f} {g.raw_bytes / 1e6:8.2f} {g.stored_bytes / 1e6:8.2f} "
                    f"{g.raw_bytes / max(g.stored_bytes, 1):6.3f} {(sum(q_errs) / len(q_errs)) if q_errs else 0.0:12.3e}  "
                    + ", ".join(f"{c}x{n}" for c, n in sorted(codecs.items()))
                )
                if a.tensors:
                    for t in g.tensors:
                        print(
                            f"      {t.name:<52} {t.codec:<13} {str(t.shape):<14} {t.stored_bytes / 1e6:8.3f} MB "
                            f"zstd={'yes' if t.compressed else 'no ':<3} relMSE={t.rel_mse:.3e} maxabs={t.max_abs_err:.3e}"
                        )
            if a.verify:
                n = sum(1 for _ in store.iter_records(vid))
                print(f"  verified {n} records: checksums ok")
    return 0


def _calibration_lines(m) -> list[str]:
    """What `sli inspect` says about how a variant was calibrated or planned."""
    q = m.quantization
    cal = q.get("calibration") or next((p.get("calibration") for p in (q.get("base_config") or {}, *(q.get("overrides") or {}).values())
                                        if isinstance(p, dict) and p.get("calibration")), None)
    lines = []
    if q.get("symmetric") or q.get("permute") not in (None, "none"):
        lines.append(f"grid: {'symmetric' if q.get('symmetric') else 'asymmetric'}, channels ordered by {q.get('permute', 'none')}")
    if cal:
        ran = m.extra.get("calibration", {})
        spill = "spilled to the cache directory" if ran.get("spilled") else "in memory"
        lines.append(
            f"calibration: {cal['method']} on {cal.get('text') or 'sli/data/calibration.txt'} (sha256 {cal['text_sha256'][:12]}), "
            f"{cal['samples']} x {cal['seqlen']} tokens{', act-order' if cal.get('act_order') else ''}; "
            + (f"took {ran['seconds']:.0f}s, peak {ran['peak_rss_bytes'] / 1e6:.0f} MB over baseline, activations "
               f"{ran['activation_bytes'] / 1e6:.0f} MB {spill}" if ran else "")
        )
    planned = q.get("planned") or {}
    if planned:
        lines.append("planned: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in planned.items()))
    return lines


_PLAN_ARGS = ("mode", "mixed", "skip", "compute_dtype", "group_size", "threshold", "no_double_quant", "target_bits",
              "symmetric", "permute", "vocab_mode", "calibrate", "calibration_text", "calibration_samples", "calibration_seqlen",
              "calibration_holdout", "act_order",
              "target_loss")


def _processor(a: argparse.Namespace, **kwargs):
    """The processor the plan options ask for (chosen by measurement when --target-bits or
    --target-loss is given; a cache directory without plan options opens the variant it holds)."""
    from sli.processor import UniversalSLIProcessor

    if getattr(a, "target_bits", None) or getattr(a, "target_loss", None):
        return UniversalSLIProcessor.for_target(a.model, target_bits=a.target_bits, target_loss=a.target_loss,
                                                calibration=_calibration_from_args(a), cache_dir=a.cache, **kwargs)
    plan = _plan_from_args(a) if _plan_given(a) or not (Path(a.model) / "data.mdb").is_file() else None
    return UniversalSLIProcessor(a.model, quantization_config=plan, cache_dir=a.cache, **kwargs)


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    from runtime.pipeline import PipelineConfig, Split

    d = PipelineConfig()
    g = p.add_argument_group("pipeline (under torchrun: each rank runs a slice of the layers inside its own --memory-budget)")
    g.add_argument("--pipeline-split", default=d.split.value, choices=[s.value for s in Split],
                   help="layers per rank: equal slices, or in proportion to each rank's budget (default: %(default)s)")
    g.add_argument("--pipeline-timeout", type=float, default=d.timeout_s,
                   help="seconds after which a rank that does not answer is gone (default: %(default)s)")
    g.add_argument("--pipeline-heartbeat", type=float, default=d.heartbeat_s,
                   help="seconds between pings round the ring while idle (default: %(default)s)")
    g.add_argument("--micro-batches", type=int, default=d.micro_batches,
                   help="most micro-batches a batched step is cut into (0: one per stage when every stage holds its layers, "
                        "prefill steps only; 1: never)")
    g.add_argument("--restart-grace", type=float, default=d.restart_grace_s,
                   help="serve: seconds the server answers after a stage is lost before it exits for torchrun to restart it")


def _pipeline_from_args(a: argparse.Namespace):
    """The pipeline config when this process is a rank of a world (started by torchrun), else None."""
    from runtime.pipeline import PipelineConfig, in_world

    if not in_world():
        return None
    return PipelineConfig(timeout_s=a.pipeline_timeout, heartbeat_s=a.pipeline_heartbeat, split=a.pipeline_split,
                          micro_batches=a.micro_batches, restart_grace_s=a.restart_grace)


def _is_stage_worker(model) -> bool:
    from runtime.pipeline.driver import StageWorker

    return isinstance(model, StageWorker)


def _copy_plan_args(sub: argparse._SubParsersAction, p: argparse.ArgumentParser, *, with_cache: bool) -> None:
    """Give ``p`` the quantize command's options that choose the variant."""
    for action in sub.choices["quantize"]._actions:
        if action.dest in _PLAN_ARGS or (with_cache and action.dest == "cache"):
            p._add_action(action)


def _add_kv_dtype(p: argparse.ArgumentParser) -> None:
    from runtime.kv import KVDtype

    p.add_argument("--kv-dtype", default=KVDtype.AUTO.value, choices=[k.value for k in KVDtype],
                   help="KV blocks in the compute dtype (auto) or int8 with per-token, per-head scales (about twice the tokens per budget)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sli", description="layer-streaming inference runtime")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch-model", help="fetch SmolLM2-135M-Instruct and convert it to an HF folder")
    f.add_argument("--gguf", action="store_true", help="also print the GGUF file's path")
    f.set_defaults(func=cmd_fetch)
    _add_quantize(sub)
    sub.choices["quantize"].set_defaults(func=cmd_quantize)
    v = sub.add_parser("validate", help="perplexity and retention against the unquantized model; a gate for pipelines")
    v.add_argument("model", nargs="?", help="model folder, .gguf file, cache directory, or the fetched model's name")
    v.add_argument("--model-path", default=None, help="only check that this model folder or file loads, and describe it")
    _copy_plan_args(sub, v, with_cache=True)
    v.add_argument("--text", default=None, help="evaluation text file (default: Python's pydoc_data topics)")
    v.add_argument("--max-tokens", type=int, default=4096)
    v.add_argument("--max-length", type=int, default=512)
    v.add_argument("--max-accuracy-loss", type=float, default=None, help="fail when perplexity rises more than this many percent")
    v.add_argument("--report", default=None, help="write the JSON report here")
    v.add_argument("--memory-budget", default=None)
    v.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype (default float32, or the plan's --compute-dtype)")
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser("chat", help="interactive chat under a memory budget, reusing the KV of earlier turns")
    c.add_argument("model", help="model folder, .gguf file, cache directory, or the fetched model's name")
    _copy_plan_args(sub, c, with_cache=True)
    c.add_argument("--memory-budget", default=None, help="e.g. 96MB, or auto: what the host (its cgroup limit, else free RAM) allows")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype (default float32, or the plan's --compute-dtype)")
    c.add_argument("--context-tokens", type=int, default=None, help="tokens of KV to reserve (default: chosen by the planner)")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--system", default=None, help="system prompt")
    _add_kv_dtype(c)
    _add_speculative(c)
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="sli against transformers and accelerate offload (AirLLM when asked) at several budgets")
    b.add_argument("model", nargs="?", default="SmolLM2-135M-Instruct", help="model folder or the fetched test model's name")
    b.add_argument("--scale", choices=["8b", "1b"], default=None,
                   help="a random model in Llama-3.1-8B's (or 3.2-1B's) shapes: quantize, stream cold under a cgroup limit, beside accelerate and llama.cpp (see sli.bench_scale)")
    b.add_argument("--limits", default=None,
                   help="--scale: memory cgroup limits, e.g. 903MiB,591MiB: every system cold inside each (sli with "
                        "--memory-budget auto), then warm without a limit, beside llama.cpp (see sli.bench_fits)")
    b.add_argument("--workdir", default=None, help="--scale: where the model, caches and GGUF go (default $SLI_HOME/scale-<shape>)")
    b.add_argument("--llama-convert", default=None, help="--scale: llama.cpp's convert_hf_to_gguf.py, to make its Q4_0")
    b.add_argument("--budgets", default=None,
                   help="--scale: comma-separated budgets (default 1GB,2GB,4GB); --serve: shape=budget pairs (default 1b=400MB,8b=2GB)")
    b.add_argument("--new-tokens-scale", type=int, default=None, help="--scale: tokens decoded per point (default 8)")
    b.add_argument("--prompt-tokens", type=int, default=None, help="--scale: prompt length for the prefill (default 512)")
    b.add_argument("--keep", action="store_true", help="--scale: keep what the run made")
    b.add_argument("--serve", action="store_true",
                   help="sli serve under 1/4/16 concurrent clients beside llama-server, cold in a cgroup (see sli.bench_serve)")
    b.add_argument("--pipeline", action="store_true",
                   help="the scale models split over ranks (each a process in its own cgroup, loopback), beside one process "
                        "streaming at one rank's budget and one holding everything (see sli.bench_pipeline)")
    b.add_argument("--splits", default=None, help="--pipeline: SHAPE=RANKSxBUDGET pairs (default 1b=2x400MB,8b=4x2GB)")
    b.add_argument("--shapes", default=None, help="--serve, --pipeline: models, comma-separated: 1b, 8b (the scale models), real (default 1b,8b)")
    b.add_argument("--clients", default=None, help="--serve: concurrent clients; --pipeline: sequences in the batch (default 1,4,16)")
    b.add_argument("--requests-per-client", type=int, default=None, help="--serve: requests each client sends (default 2)")
    b.add_argument("--llama-server", default=None, help="--serve: llama.cpp's llama-server binary")
    b.add_argument("--warm", action="store_true", help="--serve: no cgroup limit, page cache left as it is")
    b.add_argument("--cache", default=None, help="cache directory (default $SLI_HOME/cache)")
    b.add_argument("--out", default="bench-results", help="folder for bench.json, bench.md and bench.png (--scale: docs/results)")
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--modes", default="none,int8,nf4,int4")
    b.add_argument("--peers", default=None,
                   help="comma-separated: transformers, transformers-bf16, accelerate, airllm (not installed with sli), "
                        "or none (default: transformers,transformers-bf16,accelerate; --scale: accelerate,llama.cpp)")
    b.add_argument("--no-plot", action="store_true", help="no bench.png (the plot needs matplotlib: pip install 'sli[bench]')")
    b.add_argument("--prompt", default=None)
    b.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="sli's compute dtype")
    b.add_argument("--quality", action="store_true",
                   help="calibrated quantization (RTN, GPTQ, AWQ, AWQ+GPTQ) against llm-compressor and bitsandbytes NF4: "
                        "perplexity loss against bits per weight on held-out text, time and memory (see sli.bench_quality)")
    b.add_argument("--calibration-samples", type=int, default=32, help="--quality: calibration sequences (every system)")
    b.add_argument("--calibration-seqlen", type=int, default=512, help="--quality: tokens per calibration sequence")
    b.add_argument("--eval-tokens", type=int, default=2048, help="--quality: held-out tokens scored")
    b.add_argument("--grid", default=None, help="--quality: e.g. int4-g64,int4-g64-sym,int3-g64 (default: int4 g32/64/128, both grids; int3 g64)")
    b.add_argument("--methods", default=None,
                   help="--quality: sli's methods (default rtn,gptq,awq,awq+gptq,rtn:weight,gptq:activation; ':order' permutes channels)")
    b.add_argument("--quality-peers", default=None, help="--quality: llmcompressor-gptq,llmcompressor-awq,bnb-nf4 (the default)")
    b.add_argument("--bench-target-loss", type=float, default=2.0, help="--quality: the --target-loss point (0 leaves it out)")
    b.add_argument("--scale-model", default="", help="--quality: the 1 B model for time and memory (default $SLI_HOME/scale-1b/llama-1b-shape; none: skip)")
    b.add_argument("--scale-samples", type=int, default=16, help="--quality: calibration sequences on the 1 B model")
    b.set_defaults(func=cmd_bench)

    g = sub.add_parser("generate", help="stream an answer under a memory budget (quantizes first if needed)")
    g.add_argument("model", help="model folder, .gguf, SmolLM2-135M-Instruct, or a cache directory")
    g.add_argument("--prompt", required=True, help="prompt text, used as given (no chat template)")
    g.add_argument("--memory-budget", default=None, help="e.g. 256MB, 2GiB, or auto: what the host (its cgroup limit, else free RAM) allows (default: hold everything)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="compute dtype (default float32, or the plan's --compute-dtype)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop after this string (repeatable)")
    g.add_argument("--prefetch", action="store_true", help="decode the next layer on a background thread")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: compute on the GPU, layers streamed within --gpu-budget (GPU) and --memory-budget (host)")
    g.add_argument("--gpu-budget", default=None, help="GPU memory for --device cuda, e.g. 4GB")
    _add_kv_dtype(g)
    _add_speculative(g)
    _copy_plan_args(sub, g, with_cache=True)
    _add_pipeline(g)
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server, continuous batching under a memory budget")
    s.add_argument("model", help="model folder, .gguf, SmolLM2-135M-Instruct, or a cache directory")
    _copy_plan_args(sub, s, with_cache=True)
    s.add_argument("--memory-budget", default=None, help="e.g. 2GB, or auto (default: hold everything)")
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="compute dtype (default float32, or the plan's --compute-dtype)")
    s.add_argument("--context-tokens", type=int, default=None, help="tokens of KV the budget reserves for all requests together")
    _add_kv_dtype(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    s.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the model folder's name)")
    s.add_argument("--max-running", type=int, default=None, help="most sequences in the batch (default: what the KV blocks allow)")
    s.add_argument("--max-waiting", type=int, default=64, help="requests that may wait; beyond, 503 with Retry-After")
    s.add_argument("--step-tokens", type=int, default=None, help="tokens a step computes while prompts prefill (default: the prefill chunk)")
    s.add_argument("--itl-factor", type=float, default=2.0,
                   help="while streams decode, keep each step within this factor of a one-token step (0: off)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds SIGTERM lets requests in flight finish")
    s.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies are refused with 413 (default: %(default)s)")
    _add_pipeline(s)
    s.set_defaults(func=cmd_serve)
    i = sub.add_parser("inspect", help="per-layer sizes, codecs, compression and errors of a cache")
    i.add_argument("cache", type=Path)
    i.add_argument("--variant", default=None, help="variant id (or prefix)")
    i.add_argument("--tensors", action="store_true", help="one line per tensor")
    i.add_argument("--verify", action="store_true", help="read every record and check its checksum")
    i.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ModelSourceError, CacheError, KernelError, UnsupportedArchitectureError, FileNotFoundError, ValueError,
            CudaUnavailableError, ImportError, PipelineError) as e:
        print(f"sli: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
