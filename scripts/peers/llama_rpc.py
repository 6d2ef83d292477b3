#!/usr/bin/env python3
"""llama.cpp's pipeline over RPC: the peer of sli's pipeline mode (issue 29), measured.

The model's layers are cut into ``--ranks`` contiguous slices, as sli's pipeline cuts them: the
main process (the CPU backend of ``llama-bench`` / ``llama-batched-bench``) keeps the token
embedding and the first slice, and each of ``ranks - 1`` ``ggml-rpc-server`` processes on
127.0.0.1 holds the next slice (the last one also the output norm and head, which llama.cpp
counts as one more offloaded layer). llama.cpp assigns the last ``-ngl`` layers to its RPC
devices in the proportions of ``-ts`` (src/llama-model.cpp: a layer goes to the first device
whose cumulative share exceeds its index over ``ngl``); :func:`split` picks ``-ngl`` and ``-ts``
so every rank holds the same number of layers (the remainder goes to the first ranks), and the
model buffer sizes llama.cpp logs per device are recorded to show the split it made.

Measured for each run, every run a fresh main process (the RPC servers stay up across runs):

- decode speed: ``llama-bench -p 0 -n T`` (one sequence; its tg t/s, mean of ``--reps``) and
  ``llama-batched-bench -npp P -ntg T -npl B`` for each ``--batch`` B (B sequences decoding
  together, prompts not shared; its S_TG = B*T / decode time);
- bytes on the wire: separate, untimed runs through a counting TCP relay in front of each
  server (:class:`Relay`; a server's ``/proc/<pid>/io`` does not count socket traffic): a
  load-only run (one prompt token, one generated) gives what loading costs (the weights travel
  to the servers), and for each B a run generating T tokens beside one generating 1 after the
  same prompts gives the bytes per decoded token, each way, as ``difference / (B * (T - 1))``;
- memory: each process's peak resident set (``wait4``'s ``ru_maxrss`` for the main process, the
  server's ``VmHWM`` after each run (a running peak) and ``ru_maxrss`` at its end) and CPU time (user + system),
  and with ``--limit-mb`` the peak of the memory cgroup each process runs in (v1 or v2; the
  limit covers anonymous memory and page cache together, as in sli/bench_scale.py; a page is
  charged to the cgroup that first reads it, so without ``--cold`` the GGUF's cached pages
  are not in the main process's figure, though its resident set counts them).

``--local`` runs the same measurements in one process without RPC (the baseline). The result is
one JSON object on stdout, with the exact commands; progress goes to stderr. Stdlib only::

    B=~/.cache/sli/peers/llama.cpp/rpc-avx2/bin G=~/.cache/sli/scale-1b/llama-1b-q4_0.gguf
    python3 scripts/peers/llama_rpc.py --bin $B --gguf $G --local --threads 2 > local.json
    python3 scripts/peers/llama_rpc.py --bin $B --gguf $G --ranks 2 --threads 2 > rpc2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("llama_rpc")
HOST = "127.0.0.1"
CGROUP_ROOT = Path("/sys/fs/cgroup")


# -- the model's layer count (GGUF header, stdlib) ------------------------------------------------
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_block_count(path: Path) -> int:
    """``<arch>.block_count`` from a GGUF file's key-value header (format v2/v3, little-endian)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
        version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")

        def string() -> str:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", "replace")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                fmt = "<" + _GGUF_SCALARS[kind]
                return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
            if kind == 8:
                return string()
            if kind == 9:
                sub, n = struct.unpack("<IQ", f.read(12))
                if sub in _GGUF_SCALARS:  # skip without decoding (token scores, types)
                    f.seek(n * struct.calcsize("<" + _GGUF_SCALARS[sub]), 1)
                    return None
                for _ in range(n):
                    value(sub)
                return None
            raise ValueError(f"{path}: unknown GGUF value type {kind}")

        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = string()
            (kind,) = struct.unpack("<I", f.read(4))
            meta[key] = value(kind)
            arch = meta.get("general.architecture")
            if arch and f"{arch}.block_count" in meta:
                return int(meta[f"{arch}.block_count"])  # type: ignore[arg-type]
    raise ValueError(f"{path}: no <arch>.block_count key in the GGUF header")


# -- the split -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    layers: list[int]  # repeating layers per rank, the main process first
    ngl: int  # llama.cpp's -ngl: the RPC ranks' layers + 1 (the output head, on the last rank)
    ts: list[int]  # -ts proportions over the RPC devices, in --rpc order


def split(n_layer: int, ranks: int) -> Split:
    """Equal contiguous slices; the output head goes with the last slice (llama.cpp's layer
    ``n_layer``), so the last RPC device's share is one more than its layers."""
    if not 2 <= ranks <= n_layer:
        raise ValueError(f"--ranks {ranks}: the model has {n_layer} layers; use 2..{n_layer} (or --local)")
    layers = [n_layer // ranks + (1 if i < n_layer % ranks else 0) for i in range(ranks)]
    ts = layers[1:]
    ts[-1] += 1
    return Split(layers=layers, ngl=sum(ts), ts=ts)


# -- memory cgroups (the logic of sli/bench_scale.py's MemoryCgroup; one per process here) ---------
class Cgroup:
    """A child memory cgroup of this process's own with a hard limit (v1 or v2). sli's class
    names its folder by pid and limit, so one process cannot hold two of the same limit:
    each server and main process needs its own, hence this copy with a tag in the name."""

    def __init__(self, limit_bytes: int, tag: str) -> None:
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, ctrls, path = line.split(":", 2)
            for c in ctrls.split(",") if ctrls else [int(hid)]:
                own[c] = path
        if "memory" in own and (CGROUP_ROOT / "memory").is_dir():
            self.version, parent = 1, CGROUP_ROOT / "memory" / str(own["memory"]).lstrip("/")
            files = {"memory.limit_in_bytes": limit_bytes, "memory.memsw.limit_in_bytes": limit_bytes}
        elif 0 in own and (CGROUP_ROOT / "cgroup.controllers").exists():
            self.version, parent = 2, CGROUP_ROOT / str(own[0]).lstrip("/")
            files = {"memory.max": limit_bytes, "memory.swap.max": 0}
        else:
            raise OSError("this host offers no memory cgroup (neither v1's memory controller nor v2): run without --limit-mb")
        self.path = parent / f"sli-llama-rpc-{os.getpid()}-{tag}"
        self.path.mkdir(exist_ok=True)
        for name, val in files.items():
            if (self.path / name).exists():
                (self.path / name).write_text(str(val))

    def wrap(self, cmd: list[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > "{self.path / "cgroup.procs"}" && exec "$@"', "sh", *cmd]

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


# -- processes -------------------------------------------------------------------------------------
def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/{pid}/status has no VmHWM line")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reap(proc: subprocess.Popen, timeout: float) -> tuple[int, dict]:
    """Wait for ``proc`` with wait4: its exit status and its own rusage (peak RSS, CPU time)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            raise TimeoutError(f"{proc.args[0]} ran past {timeout} s and was killed")
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, {"peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
                             "cpu_s": round(ru.ru_utime + ru.ru_stime, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    hexport = f":{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1].endswith(hexport) and cols[3] == "0A":
            return True
    return False


class Relay:
    """A TCP relay in front of one RPC server that counts the bytes each way: the wire figures
    come from untimed runs through it (its copies add latency), the speeds from direct runs.
    (The servers' /proc/<pid>/io does not count socket send/recv, so it cannot serve.)"""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.counts = {"to_server_bytes": 0, "from_server_bytes": 0}
        self.lock = threading.Lock()
        self.pumps: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # closed
            server = socket.create_connection((HOST, self.target))
            for c in (client, server):
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.conns.append(c)
            for src, dst, key in ((client, server, "to_server_bytes"), (server, client, "from_server_bytes")):
                t = threading.Thread(target=self._pump, args=(src, dst, key), daemon=True)
                t.start()
                self.pumps.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, key: str) -> None:
        buf = bytearray(1 << 20)
        try:
            while n := src.recv_into(buf):
                dst.sendall(memoryview(buf)[:n])
                with self.lock:
                    self.counts[key] += n
        except OSError:
            pass
        finally:
            for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    sock.shutdown(how)
                except OSError:
                    pass

    def take(self) -> dict[str, int]:
        """The bytes since the last take, once every connection so far has closed."""
        for t in self.pumps:
            t.join(timeout=30)
            if t.is_alive():
                raise RuntimeError(f"the relay to port {self.target} still carries a connection after 30 s")
        self.pumps.clear()
        for c in self.conns:
            c.close()
        self.conns.clear()
        with self.lock:
            out = dict(self.counts)
            self.counts = dict.fromkeys(out, 0)
        return {"port": self.target, **out}

    def close(self) -> None:
        self.sock.close()


@dataclass
class Server:
    port: int
    cmd: list[str]
    proc: subprocess.Popen
    log: Path
    cgroup: Cgroup | None
    hwm_mb: list[float] = field(default_factory=list)


def start_server(bin_dir: Path, threads: int, limit: int, tag: str, logdir: Path) -> Server:
    port = free_port()
    cmd = [str(bin_dir / "ggml-rpc-server"), "-H", HOST, "-p", str(port), "-t", str(threads)]
    cg = Cgroup(limit, tag) if limit else None
    log = logdir / f"{tag}.log"
    proc = subprocess.Popen(cg.wrap(cmd) if cg else cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "GGML_RPC_NO_RDMA": "1"})
    deadline = time.monotonic() + 30
    while not listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{cmd[0]} did not start listening on {HOST}:{port}: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    logger.info("%s listening on %s:%d (pid %d)", tag, HOST, port, proc.pid)
    return Server(port=port, cmd=cmd, proc=proc, log=log, cgroup=cg)


def stop_server(s: Server) -> dict:
    s.proc.send_signal(signal.SIGTERM)
    rc, ru = reap(s.proc, timeout=20)
    out = {"cmd": s.cmd, "exit": rc, **ru, "vm_hwm_mb_after_each_run": s.hwm_mb}
    if s.cgroup:
        out["cgroup_peak_mb"] = round((s.cgroup.peak_bytes() or 0) / 2**20, 1)
        s.cgroup.close()
    return out


BUF_RE = re.compile(r"(\S+) (model|KV|compute) buffer size =\s*([\d.]+) MiB")


def drop_from_page_cache(path: Path) -> None:
    """Evict a file's clean pages (posix_fadvise DONTNEED), so the next reader pays for them and
    its cgroup is charged for them (a page is charged to the cgroup that first reads it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_main(cmd: list[str], *, servers: list[Server], limit: int, tag: str, logdir: Path, timeout: int,
             cold: Path | None = None) -> dict:
    """One fresh main process: its output, rusage, cgroup peak, the buffers llama.cpp logged
    and each server's resident peak so far. ``cold``: a file dropped from the page cache first."""
    if cold:
        drop_from_page_cache(cold)
    cpu0 = [cpu_seconds(s.proc.pid) for s in servers]
    cg = Cgroup(limit, tag) if limit else None
    log, out = logdir / f"{tag}.log", logdir / f"{tag}.out"
    t0 = time.monotonic()
    with log.open("w") as err, out.open("w") as so:
        proc = subprocess.Popen(cg.wrap(cmd) if cg else cmd, stdout=so, stderr=err,
                                env={**os.environ, "GGML_RPC_NO_RDMA": "1"})
        rc, ru = reap(proc, timeout)
    wall = time.monotonic() - t0
    for s in servers:
        s.hwm_mb.append(round(vm_hwm_mb(s.proc.pid), 1))
    servers_cpu = [round(cpu_seconds(s.proc.pid) - c, 2) for s, c in zip(servers, cpu0)]
    text = log.read_text()
    res = {"cmd": cmd, "exit": rc, "wall_s": round(wall, 2), "main": ru, "servers_cpu_s": servers_cpu,
           "buffers_mib": [{"buffer": b, "kind": k, "mib": float(m)} for b, k, m in BUF_RE.findall(text)]}
    if cg:
        res["main"]["cgroup_peak_mb"] = round((cg.peak_bytes() or 0) / 2**20, 1)
        cg.close()
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} exited {rc}; stderr tail ({log}):\n{text[-3000:]}")
    res["stdout"] = out.read_text()
    return res


def batched_row(stdout: str, b: int) -> dict:
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if len(rows) != 1:
        raise RuntimeError(f"llama-batched-bench B={b} gave {len(rows)} result rows, expected 1")
    return rows[0]


# -- the measurement -------------------------------------------------------------------------------
def measure(a: argparse.Namespace) -> dict:
    bin_dir, gguf = a.bin.resolve(), a.gguf.resolve()
    for exe in ("llama-bench", "llama-batched-bench") + (() if a.local else ("ggml-rpc-server",)):
        if not (bin_dir / exe).is_file():
            raise FileNotFoundError(f"{bin_dir / exe} is missing: build it with `scripts/setup_peers.sh llama-rpc`")
    n_layer = gguf_block_count(gguf)
    limit = a.limit_mb << 20
    logdir = Path(a.logs).resolve()
    logdir.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in a.batch.split(",")]
    th, m = str(a.threads), ["-m", str(gguf)]
    bb = str(bin_dir / "llama-batched-bench")

    res: dict = {"gguf": str(gguf), "n_layer": n_layer, "bin": str(bin_dir), "threads": a.threads, "cold": a.cold,
                 "limit_mb": a.limit_mb, "tokens": a.tokens, "prompt": a.prompt, "batches": batches,
                 "host": {"cpu": cpu_name(), "cores": os.cpu_count(), "kernel": platform.release(),
                          "loadavg_at_start": os.getloadavg()}, "logs": str(logdir)}
    servers: list[Server] = []
    runs: dict = {}

    def go(name: str, cmd: list[str]) -> dict:
        logger.info("%s: %s", name, " ".join(cmd))
        r = run_main(cmd, servers=servers, limit=limit, tag=name, logdir=logdir, timeout=a.timeout,
                     cold=gguf if a.cold else None)
        runs[name] = r
        logger.info("%s: %.1f s, main peak RSS %.0f MB", name, r["wall_s"], r["main"]["peak_rss_mb"])
        return r

    def load_cmd(dist: list[str]) -> list[str]:  # one prompt token, one generated: loading costs
        return [bb, *m, *dist, "-t", th, "-c", "64", "-npp", "1", "-ntg", "1", "-npl", "1", "--output-format", "jsonl", "-lv", "4"]

    def batched_cmd(dist: list[str], b: int, tokens: int = a.tokens) -> list[str]:
        return [bb, *m, *dist, "-t", th, "-c", str(b * (a.prompt + a.tokens) + 16), "-npp", str(a.prompt),
                "-ntg", str(tokens), "-npl", str(b), "--output-format", "jsonl", "-lv", "4"]

    try:
        if a.local:
            res["mode"] = "local"
            dist: list[str] = ["-ngl", "0"]
        else:
            sp = split(n_layer, a.ranks)
            res.update(mode="rpc", ranks=a.ranks, split={"layers_per_rank": sp.layers, "ngl": sp.ngl, "ts": sp.ts})
            for i in range(a.ranks - 1):
                servers.append(start_server(bin_dir, a.threads, limit, f"rpc-server-{i + 1}", logdir))

            def rpc_dist(ports: list[int]) -> list[str]:
                # "/" between -ts proportions: llama-bench reads commas as values to sweep
                return ["--rpc", ",".join(f"{HOST}:{p}" for p in ports), "-ngl", str(sp.ngl), "-ts", "/".join(map(str, sp.ts))]

            dist = rpc_dist([s.port for s in servers])
        go("load", load_cmd(dist)).pop("stdout")
        r = go("llama-bench-tg", [str(bin_dir / "llama-bench"), *m, *dist, "-t", th, "-p", "0", "-n", str(a.tokens),
                                  "-r", str(a.reps), "-o", "json"])
        rec = json.loads(r.pop("stdout"))[0]
        r.update(tg_tok_s=round(rec["avg_ts"], 3), tg_tok_s_stddev=round(rec["stddev_ts"], 3),
                 samples_tok_s=[round(x, 3) for x in rec.get("samples_ts", [])])
        for b in batches:
            r = go(f"batched-b{b}", batched_cmd(dist, b))
            row = r["row"] = batched_row(r.pop("stdout"), b)
            r.update(decode_tok_s=round(row["speed_tg"], 3), prefill_tok_s=round(row["speed_pp"], 3))  # B*T / decode time
        if servers and a.wire:  # the wire, through counting relays (untimed)
            relays = [Relay(s.port) for s in servers]
            try:
                wdist = rpc_dist([rl.port for rl in relays])
                go("wire-load", load_cmd(wdist)).pop("stdout")
                wl = runs["wire-load"]["wire"] = [rl.take() for rl in relays]
                res["weights_upload_bytes_est"] = sum(w["to_server_bytes"] for w in wl)
                for b in batches:  # T tokens and 1 token after the same prompts: the difference is decode alone
                    for name, cmd in ((f"wire-b{b}-t1", batched_cmd(wdist, b, tokens=1)), (f"wire-b{b}", batched_cmd(wdist, b))):
                        r = go(name, cmd)
                        batched_row(r.pop("stdout"), b)
                        r["wire"] = [rl.take() for rl in relays]
                    w, w1 = runs[f"wire-b{b}"]["wire"], runs[f"wire-b{b}-t1"]["wire"]
                    runs[f"wire-b{b}"]["per_decoded_token"] = {
                        key: round(sum(x[key] - y[key] for x, y in zip(w, w1)) / (b * (a.tokens - 1)))
                        for key in ("to_server_bytes", "from_server_bytes")}
            finally:
                for rl in relays:
                    rl.close()
        res["runs"] = runs
    finally:
        res["servers"] = [stop_server(s) for s in servers]
    res["host"]["loadavg_at_end"] = os.getloadavg()
    return res


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, required=True, help="llama.cpp's bin folder (built with -DGGML_RPC=ON)")
    ap.add_argument("--gguf", type=Path, required=True)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ranks", type=int, help="processes the layers are split over: the main one + ranks-1 RPC servers")
    mode.add_argument("--local", action="store_true", help="one process, no RPC (the baseline)")
    ap.add_argument("--limit-mb", type=int, default=0, help="a memory cgroup of this many MB around each process (0: none)")
    ap.add_argument("--batch", default="1,4,16", help="sequences decoding together (llama-batched-bench -npl)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per sequence (at least 2)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence (batched-bench)")
    ap.add_argument("--threads", type=int, default=2, help="threads of each process")
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds one main process may run")
    ap.add_argument("--cold", action="store_true", help="drop the GGUF from the page cache before each run "
                    "(then each main process's cgroup is charged for the file pages it reads)")
    ap.add_argument("--no-wire", dest="wire", action="store_false", help="skip the runs through the counting relays")
    ap.add_argument("--logs", default="llama-rpc-logs", help="folder for every process's log")
    a = ap.parse_args()
    if a.tokens < 2:
        ap.error(f"--tokens {a.tokens}: the bytes per decoded token need at least 2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(measure(a), indent=1))


if __name__ == "__main__":
    main()
