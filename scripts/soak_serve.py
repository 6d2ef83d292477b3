"""Soak `sli serve`: a bounded mix of work for a set time, a quantize into its cache halfway.

    python scripts/soak_serve.py SmolLM2-135M-Instruct --minutes 10 --out soak-results

Starts `sli serve` on loopback (nothing else is ever addressed), measures the greedy answers to a
few prompts while nothing else runs, then lets ``--clients`` threads send, at random (seeded):
completions and chats, streaming and not; streams the client drops after a few chunks; malformed
JSON; bodies over the server's limit; prompts longer than the context; and the greedy prompts
again, whose answers must equal the quiet ones. Halfway, `sli quantize` writes another variant
into the server's cache. Every 5 s it samples the server's anonymous memory (RssAnon) and open
file descriptors. Writes ``soak.json`` and ``soak.md``: requests served, errors by kind (the
expected 4xx apart from the rest), p50/p99 latency per minute, memory and descriptors at the
start, a minute in and at the end, and whether the goals hold (no unexpected error, no greedy
mismatch, memory grown under 5% after the first minute's warm-up, descriptors under 5%, p99 of
the last minute within 1.5x the first's).

Bounded: it stops after ``--minutes`` or ``--max-requests``, whichever comes first.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

KEY = "sk-soak"
GREEDY = ["The capital of France is", "def add(a, b):\n    return", "Water boils at"]
CHAT = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a primary color."}],
        [{"role": "user", "content": "What is two plus two?"}]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_status(pid: int) -> tuple[int, int]:
    """(anonymous resident bytes, open file descriptors) of a process."""
    anon = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
    return anon, len(os.listdir(f"/proc/{pid}/fd"))


class Client:
    def __init__(self, port: int, model: str) -> None:
        self.port, self.model = port, model

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def post(self, path: str, body: bytes | dict, *, stream: bool = False, drop_after: int | None = None) -> tuple[int, dict | str]:
        """POST and read the answer: (status, JSON body or the streamed text). ``drop_after``:
        close the connection after that many streamed events (a client going away)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        c = self._conn()
        try:
            c.request("POST", path, body=data, headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            r = c.getresponse()
            if not stream or r.status != 200:
                raw = r.read()
                return r.status, json.loads(raw) if raw else {}
            text, events = [], 0
            for line in r:
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                if payload == b"[DONE]":
                    break
                ev = json.loads(payload)
                if "error" in ev:
                    return 500, ev
                for ch in ev.get("choices", []):
                    text.append(ch.get("text") or (ch.get("delta") or {}).get("content") or "")
                events += 1
                if drop_after is not None and events >= drop_after:
                    return 499, "dropped"
            return 200, "".join(text)
        finally:
            c.close()

    def health(self) -> dict:
        c = self._conn()
        try:
            c.request("GET", "/health", headers={"Authorization": f"Bearer {KEY}"})
            return json.loads(c.getresponse().read())
        finally:
            c.close()

    def greedy(self, prompt: str) -> str:
        status, body = self.post("/v1/completions", {"model": self.model, "prompt": prompt, "max_tokens": 12, "temperature": 0})
        if status != 200:
            raise RuntimeError(f"greedy request answered {status}: {body}")
        return body["choices"][0]["text"]


class Soak:
    def __init__(self, client: Client, *, context: int, seed: int, quiet: dict[str, str]) -> None:
        self.client, self.context, self.quiet = client, context, quiet
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.latencies: list[tuple[float, float, str]] = []  # (time since start, seconds, kind)
        self.outcomes: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.mismatches: list[str] = []
        self.t0 = time.monotonic()

    def one(self, rng: random.Random) -> None:
        kind = rng.choice(["completion", "completion_stream", "chat", "chat_stream", "drop", "malformed", "oversized",
                           "over_context", "greedy", "greedy"])
        m = self.client.model
        n = rng.randint(4, 24)
        expect, stream, drop = 200, False, None
        if kind == "completion":
            path, body = "/v1/completions", {"model": m, "prompt": rng.choice(GREEDY), "max_tokens": n, "temperature": 0.8, "seed": rng.randint(0, 99)}
        elif kind == "completion_stream":
            path, body, stream = "/v1/completions", {"model": m, "prompt": rng.choice(GREEDY), "max_tokens": n, "stream": True}, True
        elif kind == "chat":
            path, body = "/v1/chat/completions", {"model": m, "messages": rng.choice(CHAT), "max_tokens": n}
        elif kind == "chat_stream":
            path, body, stream = "/v1/chat/completions", {"model": m, "messages": rng.choice(CHAT), "max_tokens": n, "stream": True}, True
        elif kind == "drop":
            path, body, stream, drop, expect = ("/v1/completions", {"model": m, "prompt": rng.choice(GREEDY), "max_tokens": 64,
                                                "stream": True, "ignore_eos": True}, True, rng.randint(1, 3), 499)
        elif kind == "malformed":
            path, body, expect = "/v1/completions", b'{"model": "' + m.encode() + b'", "prompt": ', 400
        elif kind == "oversized":
            path, body, expect = "/v1/completions", b'{"model": "x", "prompt": "' + b"a " * (3 << 20) + b'"}', 413
        elif kind == "over_context":
            path, body, expect = "/v1/completions", {"model": m, "prompt": [1] * (self.context + 8), "max_tokens": 4}, 400
        else:
            prompt = rng.choice(GREEDY)
            t = time.monotonic()
            got = self.client.greedy(prompt)
            with self.lock:
                self.latencies.append((t - self.t0, time.monotonic() - t, kind))
                self.outcomes["greedy 200"] += 1
                if got != self.quiet[prompt]:
                    self.mismatches.append(f"{prompt!r}: {got!r} != quiet {self.quiet[prompt]!r}")
            return
        t = time.monotonic()
        status, answer = self.client.post(path, body, stream=stream, drop_after=drop)
        dt = time.monotonic() - t
        with self.lock:
            self.outcomes[f"{kind} {status}"] += 1
            if status == 503:  # a full queue: documented back-pressure, not an error of the server
                return
            if status != expect:
                self.unexpected.append(f"{kind}: {status} (expected {expect}): {str(answer)[:300]}")
            elif status == 200:
                self.latencies.append((t - self.t0, dt, kind))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model (name, folder or .gguf) the server serves")
    ap.add_argument("--mode", default="int8")
    ap.add_argument("--quantize-mode", default="nf4", help="the variant quantized into the same cache halfway")
    ap.add_argument("--cache", type=Path, default=None, help="cache directory (default: a new one under --out)")
    ap.add_argument("--memory-budget", default="200MB")
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("soak-results"))
    ap.add_argument("--render", type=Path, default=None, help="only write soak.md again from this soak.json")
    a = ap.parse_args()
    if a.render is not None:
        report = _with_warm(json.loads(a.render.read_text()))
        a.render.write_text(json.dumps(report, indent=2))
        a.render.with_suffix(".md").write_text(_markdown(report))
        print(_markdown(report))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    cache = a.cache or a.out / "cache"
    sli = [sys.executable, "-m", "sli.cli"]
    port = _free_port()
    log = open(a.out / "server.log", "w")
    server = subprocess.Popen([*sli, "serve", a.model, "--mode", a.mode, "--cache", str(cache), "--memory-budget", a.memory_budget,
                               "--context-tokens", str(a.context_tokens), "--port", str(port), "--api-key", KEY,
                               "--served-model-name", "soak"], stdout=log, stderr=subprocess.STDOUT)
    client = Client(port, "soak")
    try:
        deadline = time.monotonic() + 1800
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode}); see {a.out / 'server.log'}")
            try:
                client.health()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start in 30 minutes") from None
                time.sleep(0.5)
        quiet = {p: client.greedy(p) for p in GREEDY}
        soak = Soak(client, context=a.context_tokens, seed=a.seed, quiet=quiet)
        samples: list[tuple[float, int, int]] = [(0.0, *_proc_status(server.pid))]
        end = soak.t0 + 60 * a.minutes
        count = [0]
        stop = threading.Event()

        def worker(i: int) -> None:
            rng = random.Random(a.seed * 1000 + i)
            while not stop.is_set() and time.monotonic() < end:
                with soak.lock:
                    if count[0] >= a.max_requests:
                        return
                    count[0] += 1
                try:
                    soak.one(rng)
                except Exception as e:  # a transport error is an unexpected outcome, counted
                    with soak.lock:
                        soak.outcomes[f"exception {type(e).__name__}"] += 1
                        soak.unexpected.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(a.clients)]
        for t in threads:
            t.start()
        quantize = None
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            now = time.monotonic() - soak.t0
            if server.poll() is not None:
                stop.set()
                soak.unexpected.append(f"the server exited with {server.returncode}")
                break
            samples.append((now, *_proc_status(server.pid)))
            if quantize is None and now > 30 * a.minutes:
                quantize = subprocess.Popen([*sli, "quantize", a.model, "--mode", a.quantize_mode, "--cache", str(cache)],
                                            stdout=subprocess.DEVNULL, stderr=open(a.out / "quantize.log", "w"))
                quantize_started = now
        for t in threads:
            t.join()
        q_rc = quantize.wait() if quantize is not None else None
        # the cache is settled: the end sample is taken after the last request, as the start one before the first
        time.sleep(2)
        samples.append((time.monotonic() - soak.t0, *_proc_status(server.pid)))
    finally:
        server.terminate()
        rc = server.wait(timeout=120)
        log.close()
    report = _report(soak, samples, a, quantize_rc=q_rc, quantize_at=quantize_started if quantize else None, server_rc=rc)
    (a.out / "soak.json").write_text(json.dumps(report, indent=2))
    (a.out / "soak.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0 if report["goals_met"] else 1


def _pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))


def _report(soak: Soak, samples, a, *, quantize_rc, quantize_at, server_rc) -> dict:
    by_minute: dict[int, list[float]] = defaultdict(list)
    for t, dt, _ in soak.latencies:
        by_minute[int(t // 60)].append(dt)
    minutes = [{"minute": m, "requests": len(v), "p50_s": _pct(v, 50), "p99_s": _pct(v, 99)} for m, v in sorted(by_minute.items())]
    full = [m for m in minutes if m["minute"] < int(a.minutes)]  # whole minutes only
    (t0, anon0, fd0), (t1, anon1, fd1) = samples[0], samples[-1]
    p99_ratio = full[-1]["p99_s"] / full[0]["p99_s"] if len(full) >= 2 else float("nan")
    expected = {k: v for k, v in soak.outcomes.items() if k.split()[-1] in ("400", "413", "499", "503")}
    report = {
        "model": a.model, "mode": a.mode, "memory_budget": a.memory_budget, "clients": a.clients, "minutes": a.minutes,
        "requests": sum(soak.outcomes.values()), "served_200": sum(v for k, v in soak.outcomes.items() if k.endswith(" 200")),
        "outcomes": dict(sorted(soak.outcomes.items())), "expected_4xx_503": expected,
        "unexpected": soak.unexpected[:50], "unexpected_count": len(soak.unexpected), "greedy_mismatches": soak.mismatches[:50],
        "latency_by_minute": minutes, "p99_last_over_first_minute": p99_ratio,
        "anon_bytes_start": anon0, "anon_bytes_end": anon1, "anon_growth": anon1 / anon0 - 1,
        "fds_start": fd0, "fds_end": fd1, "fd_growth": fd1 / fd0 - 1,
        "samples": [{"t_s": t, "anon_bytes": an, "fds": fd} for t, an, fd in samples],
        "quantize_mode": a.quantize_mode, "quantize_started_s": quantize_at, "quantize_exit": quantize_rc, "server_exit": server_rc,
        "cpu": _cpu(),
    }
    return _with_warm(report)


def _with_warm(r: dict) -> dict:
    """Growth from the first sample a minute in: the first requests fault in the KV pool and the
    allocator's arenas (a step up, then flat); a leak keeps growing after it."""
    warm = next((x for x in r["samples"] if x["t_s"] >= 60), r["samples"][-1])
    r["anon_bytes_warm"] = warm["anon_bytes"]
    r["anon_growth_after_warmup"] = r["anon_bytes_end"] / warm["anon_bytes"] - 1
    # flat: no growth past 5% once the load's working set (batch activations, logits, the
    # allocator's arenas) is in, which the first seconds of load bring from an idle start
    r["goals_met"] = bool(r["unexpected_count"] == 0 and not r["greedy_mismatches"] and r["p99_last_over_first_minute"] <= 1.5
                          and r["quantize_exit"] == 0 and r["server_exit"] == 0 and r["anon_growth_after_warmup"] < 0.05
                          and r["fd_growth"] < 0.05)
    return r


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return "unknown"


def _markdown(r: dict) -> str:
    mib = 1 << 20
    lines = [
        f"# sli serve soak: {r['model']} ({r['mode']}, budget {r['memory_budget']}), {r['clients']} clients, {r['minutes']:g} min",
        "", f"CPU: {r['cpu']}. `sli quantize --mode {r['quantize_mode']}` into the same cache from {r['quantize_started_s']:.0f} s "
        f"(exit {r['quantize_exit']}); server exit {r['server_exit']}.", "",
        f"- requests: {r['requests']}, answered 200: {r['served_200']}",
        f"- unexpected errors: {r['unexpected_count']}; greedy answers unlike the quiet run: {len(r['greedy_mismatches'])}",
        f"- anonymous memory: {r['anon_bytes_start'] / mib:.1f} MiB at the start, {r['anon_bytes_end'] / mib:.1f} MiB at the end "
        f"({100 * r['anon_growth']:+.1f}%); from {r['anon_bytes_warm'] / mib:.1f} MiB a minute in "
        f"({100 * r['anon_growth_after_warmup']:+.2f}%)",
        f"- open file descriptors: {r['fds_start']} -> {r['fds_end']} ({100 * r['fd_growth']:+.1f}%)",
        f"- p99 latency, last whole minute over first: {r['p99_last_over_first_minute']:.2f}x",
        f"- goals met: {r['goals_met']}", "", "| outcome | count |", "|---|---:|",
        *[f"| {k} | {v} |" for k, v in r["outcomes"].items()], "", "| minute | requests (200) | p50 s | p99 s |", "|---:|---:|---:|---:|",
        *[f"| {m['minute']} | {m['requests']} | {m['p50_s']:.2f} | {m['p99_s']:.2f} |" for m in r["latency_by_minute"]],
    ]
    if r["unexpected"]:
        lines += ["", "Unexpected:", *[f"- {u}" for u in r["unexpected"]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
