#!/usr/bin/env python3
"""Check each llama.cpp build on the real model and pick the fastest that runs correctly.

For every build under ``<peers>/llama.cpp/<isa>/bin`` (run by ``scripts/setup_peers.sh llama``,
stdlib only):

- correctness on the real model's GGUF: a greedy completion (``llama-completion --temp 0``)
  beside transformers' greedy continuation of the same prompt on the bf16 HF folder (run once
  in sli's python), and ``llama-perplexity`` on a local text (4 windows of 128 tokens of the
  repo's LICENSE), which every correct build must agree on (within 1% of the builds' median);
- speed, the builds in turn, ``--rounds`` times (the best round of each counts: other work on a
  shared host slows some rounds, never speeds one up): the CPU time one thread spends on
  ``llama-bench -t 1`` for pp64 and for tg16, as shipped and with the CPU's repacked weight
  layouts off (``--repack 0``), on the real model and on ``--speed-gguf`` (the 1 B Q4_0, whose
  matrix products dominate its time as the 135 M model's do not). CPU time, not wall time,
  decides: on a loaded host wall time measures the other work, and two threads spend it in
  ggml's spinning barriers waiting for each other. Wall-clock tok/s on the real model
  (``-t 1,2``, repack on and off) are recorded once per build.

A crash is recorded with its signal and any new kernel line (``dmesg``: a general protection
fault, an invalid opcode) naming the library and offset. The fastest correct build is linked as
``llama.cpp/best``: least CPU time for pp64 + tg16 (one thread, repack on, best round) on the
speed model; builds within :data:`TIE` of it count as tied, and the widest instruction set among
them is taken (the order of ``--isas``). ``best.json`` holds every figure and the rule.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
from pathlib import Path

PROMPT = "The history of computing is a story of machines that"
N_PREDICT = 24
THREADS = str(min(os.cpu_count() or 2, 2))  # the greedy completion and perplexity
BENCH_THREADS = sorted({1, int(THREADS)})  # llama-bench: one thread (the ISA comparison) and all
TIE = 0.05  # CPU times this close to the least count as equal (rounds on a shared host vary more)


def dmesg() -> list[str]:
    try:
        return subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []


def run(cmd: list[str], timeout: int = 900) -> dict:
    """Run one command; its exit, output, and the kernel lines it caused (a crash's fault)."""
    before = len(dmesg())
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, out, err = cp.returncode, cp.stdout, cp.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", e.stdout or "", e.stderr or ""
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    res = {"cmd": " ".join(cmd), "rc": rc, "stdout": out, "stderr": err}
    if isinstance(rc, int) and rc < 0:
        res["signal"] = signal.Signals(-rc).name
    if rc != 0:
        res["kernel"] = [ln for ln in dmesg()[before:] if re.search(r"traps:|general protection|segfault|invalid opcode", ln)]
    return res


def failed(res: dict, what: str) -> str:
    tail = (res["stderr"].strip().splitlines() or [""])[-1]
    sig = f" ({res['signal']})" if "signal" in res else ""
    kern = f"; kernel: {res['kernel'][-1]}" if res.get("kernel") else ""
    return f"{what} exited {res['rc']}{sig}: {tail}{kern}"


def bench(bindir: Path, gguf: str) -> tuple[dict, str]:
    """One llama-bench run: pp64 and tg16, repack on and off, on 1 and 2 threads, 3 repetitions each."""
    res = run([str(bindir / "llama-bench"), "-m", gguf, "-p", "64", "-n", "16", "-t", ",".join(map(str, BENCH_THREADS)),
               "-r", "3", "--repack", "0,1", "-o", "json"])
    if res["rc"] != 0:
        return {}, failed(res, "llama-bench")
    figs = {}
    for row in json.loads(res["stdout"]):
        kind = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        figs[f"{kind}_t{row['n_threads']}{'' if row['repack'] else '_no_repack'}"] = round(row["avg_ts"], 2)
    return figs, ""


def cpu_bench(bindir: Path, gguf: str, reps: int) -> tuple[dict, str]:
    """The CPU time one thread spends on a fixed llama-bench workload (warm-up, ``reps``
    repetitions, model load included): prompt (pp64) and decode (tg16), repack on and off. Other
    work on the host stretches wall time, not (much) the CPU time a single thread needs, so this
    is the comparison of instruction sets that a shared host still allows."""
    figs = {}
    for kind, args in (("pp64", ["-p", "64", "-n", "0"]), ("tg16", ["-p", "0", "-n", "16"])):
        for repack in (1, 0):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            res = run([str(bindir / "llama-bench"), "-m", gguf, *args, "-t", "1", "-r", str(reps), "--repack", str(repack),
                       "-o", "json"], timeout=1800)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if res["rc"] != 0:
                return {}, failed(res, "llama-bench")
            key = f"{kind}{'' if repack else '_no_repack'}"
            figs[f"{key}_cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)
            figs[f"{key}_t1"] = round(json.loads(res["stdout"])[0]["avg_ts"], 2)
    return figs, ""


def summarise(rounds: list[dict]) -> dict:
    """Per figure: the best round (the least disturbed by other work on a shared host) and the median."""
    out = {}
    for k in rounds[0]:
        vals = [r[k] for r in rounds]
        best = min(vals) if k.endswith("_cpu_s") else max(vals)  # seconds: least; tok/s: most
        out[k] = {"best": best, "median": statistics.median(vals), "rounds": vals}
    return out


def complete(bindir: Path, gguf: str) -> tuple[str, str]:
    res = run([str(bindir / "llama-completion"), "-m", gguf, "-p", PROMPT, "-n", str(N_PREDICT), "--temp", "0",
               "-no-cnv", "-t", THREADS, "--no-display-prompt", "--no-warmup", "-c", "256"], timeout=300)
    if res["rc"] != 0:
        return "", failed(res, "llama-completion")
    return res["stdout"].strip(), ""


def perplexity(bindir: Path, gguf: str, text: Path) -> tuple[float, str]:
    res = run([str(bindir / "llama-perplexity"), "-m", gguf, "-f", str(text), "-c", "128", "-b", "128", "--chunks", "4",
               "-t", THREADS], timeout=900)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", res["stdout"] + res["stderr"])
    if res["rc"] != 0 or not m:
        return 0.0, failed(res, "llama-perplexity")
    return float(m.group(1)), ""


def reference(python: str, model: str) -> str:
    """transformers' greedy continuation (fp32) of the same prompt on the same weights."""
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1]); m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
        "ids = tok(sys.argv[2], return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=int(sys.argv[3]), do_sample=False)\n"
        "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))\n"
    )
    cp = subprocess.run([python, "-c", code, model, PROMPT, str(N_PREDICT)], capture_output=True, text=True,
                        env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if cp.returncode != 0:
        raise SystemExit(f"transformers reference failed: {cp.stderr[-2000:]}")
    return cp.stdout.strip()


def common_words(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=Path, required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--isas", nargs="+", required=True)
    ap.add_argument("--reference-python", required=True)
    ap.add_argument("--model", required=True, help="the bf16 HF folder of the same weights")
    ap.add_argument("--speed-gguf", help="a larger model the speed rounds also run (the 1 B Q4_0); it decides when given")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[2] / "LICENSE")
    a = ap.parse_args()
    root = a.peers / "llama.cpp"
    ref = reference(a.reference_python, a.model)
    print(f"transformers (fp32) greedy: {ref!r}", file=sys.stderr)
    builds = {}
    for isa in a.isas:
        d = root / isa
        b = {"dir": str(d), "flags": (d / ".built").read_text().strip() if (d / ".built").exists() else ""}
        builds[isa] = b
        if not (d / ".built").exists():
            b["error"] = (d / ".failed").read_text().strip() if (d / ".failed").exists() else "not built"
            continue
        bindir = d / "bin"
        info = run([str(bindir / "llama-cli"), "--version"], timeout=60)
        b["version"] = (info["stdout"] + info["stderr"]).strip().splitlines()[:2]
        errors = []
        b["greedy"], e = complete(bindir, a.gguf)
        errors += [e] if e else []
        b["greedy_words_equal_transformers"] = common_words(b["greedy"], ref) if b["greedy"] else 0
        b["perplexity"], e = perplexity(bindir, a.gguf, a.text)
        errors += [e] if e else []
        if errors:
            b["error"] = "; ".join(errors)
        print(f"{isa}: {json.dumps({k: b[k] for k in ('greedy', 'perplexity', 'error') if k in b})}", file=sys.stderr)
    ran = [k for k, b in builds.items() if "error" not in b]
    if not ran:
        raise SystemExit(f"no build ran: {json.dumps(builds, indent=1)}")
    med = statistics.median(builds[k]["perplexity"] for k in ran)
    for k in ran:
        if abs(builds[k]["perplexity"] / med - 1) > 0.01:
            builds[k]["error"] = f"perplexity {builds[k]['perplexity']} is off the builds' median {med}"

    # speed: the builds in turn, a.rounds times, so that load from other work falls on all alike;
    # CPU time on one thread on each model, then wall-clock tok/s on the real model once
    models = {"real": (a.gguf, 3)} | ({"speed": (a.speed_gguf, 2)} if a.speed_gguf else {})
    for name, (gguf, reps) in models.items():
        rounds: dict[str, list[dict]] = {k: [] for k, b in builds.items() if "error" not in b}
        for i in range(a.rounds):
            for isa in list(rounds):
                figs, e = cpu_bench(root / isa / "bin", gguf, reps)
                if e:
                    builds[isa]["error"] = e
                    del rounds[isa]
                    continue
                rounds[isa].append(figs)
                print(f"{isa} {name} round {i + 1}: {figs}", file=sys.stderr)
        for isa, r in rounds.items():
            builds[isa][f"cpu_bench_{name}"] = summarise(r)
    for isa in [k for k, b in builds.items() if "error" not in b]:
        figs, e = bench(root / isa / "bin", a.gguf)
        if e:
            builds[isa]["error"] = e
        builds[isa]["bench_real_wall"] = figs
        print(f"{isa} wall: {figs}", file=sys.stderr)
    ok = [k for k in builds if "error" not in builds[k]]
    if not ok:
        raise SystemExit(f"no build runs correctly: {json.dumps(builds, indent=1)}")
    decide = "speed" if a.speed_gguf else "real"

    def seconds(k: str) -> float:  # CPU seconds of pp64 + tg16 as shipped (repack on), one thread
        f = builds[k][f"cpu_bench_{decide}"]
        return f["pp64_cpu_s"]["best"] + f["tg16_cpu_s"]["best"]

    least = min(seconds(k) for k in ok)
    for k in ok:
        builds[k]["pp64_tg16_cpu_s"] = round(seconds(k), 3)
        builds[k]["vs_least"] = round(seconds(k) / least, 3)
    # within TIE of the least count as equally fast; then the order given (widest ISA first) decides
    best = next(k for k in a.isas if k in ok and seconds(k) <= least * (1 + TIE))
    out = {"best": best, "best_dir": builds[best]["dir"],
           "chosen_by": f"least CPU time for llama-bench pp64 + tg16 (one thread, repack on, best of {a.rounds} rounds) "
                        f"on {models[decide][0]}, among builds whose greedy completion and perplexity agree; builds within "
                        f"{TIE:.0%} of the least count as tied and the first of {a.isas} among them is taken",
           "gguf": a.gguf, "speed_gguf": a.speed_gguf, "threads": int(THREADS), "bench_threads": BENCH_THREADS,
           "load_average_at_end": os.getloadavg(), "prompt": PROMPT, "transformers_greedy": ref,
           "perplexity_text": str(a.text),
           "cpu_flags": sorted(set(re.findall(r"\b(avx512\w*|amx\w*|avx_vnni|avx2|fma|f16c)\b", Path("/proc/cpuinfo").read_text()))),
           "builds": builds}
    (root / "best.json").write_text(json.dumps(out, indent=1) + "\n")
    link = root / "best"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(best)
    print(f"best: {best} -> {link}", file=sys.stderr)


if __name__ == "__main__":
    main()
