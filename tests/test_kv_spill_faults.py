"""The KV spill never stops generation: a full disk, a read-only cache and a damaged spill
file, each made for real (a tmpfs filled up, a read-only bind mount, a data file cut short
or with a page zeroed), are answered by spilling elsewhere, not spilling, or setting the
damaged store aside, said in one warning line; the request itself always completes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
import torch

from conftest import make_tiny_model
from sli import QuantizationConfig, UniversalSLIProcessor

ROOT = Path(__file__).resolve().parents[1]
PROMPT = " ".join(f"word{5 + (i * 7) % 200}" for i in range(70))  # 70 tokens: 4 full blocks of 16 to spill
KW = dict(quantization_config=QuantizationConfig(mode="none"), memory_budget=1 << 40, context_tokens=128, progress=False)


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here ({r.stderr.strip()}): this failure is covered only where root may mount")


@pytest.fixture
def disk(tmp_path):
    """A real 48 MiB file system (tmpfs), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt))
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> None:
    """Write a file until the file system says it is full."""
    with open(mnt / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    assert os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize < (1 << 20)


def _cache(tiny_root, where: Path) -> Path:
    path = make_tiny_model(tiny_root, "llama", layers=3, seed=17)
    UniversalSLIProcessor(path, cache_dir=where, **KW).quantize()
    return where


def _generate(cache: Path, home: Path) -> subprocess.CompletedProcess:
    """`sli generate` on a cache, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "sli.cli", "generate", str(cache), "--mode", "none", "--prompt", PROMPT, "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), SLI_HOME=str(home)),
    )


def _spill_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "KV spill" in line]


def test_generate_from_a_cache_on_a_full_disk_spills_elsewhere_or_not_at_all(tmp_path, tiny_root, disk):
    cache = _cache(tiny_root, disk / "c")
    _fill(disk)
    r = _generate(cache, tmp_path / "home")  # before: killed by SIGBUS creating the spill store
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    (line,) = _spill_lines(r.stderr)
    assert "MiB free" in line and f"spilling to {tmp_path / 'home' / 'kv-spill'}" in line, line
    assert "Traceback" not in r.stderr and "[prompt 70 tokens, 4 new" in r.stderr
    r = _generate(cache, disk / "home")  # the fallback is on the full disk too: no spilling, said once
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    (line,) = _spill_lines(r.stderr)
    assert line.count("MiB free") == 2 and "spilling is off" in line, line
    assert not (disk / "c" / "kv-spill" / "data.mdb").exists()


def test_a_disk_that_fills_while_running_loses_spills_not_requests(tmp_path, tiny_root, disk, caplog, monkeypatch):
    cache = _cache(tiny_root, disk / "c")
    p = UniversalSLIProcessor(cache, **KW)
    p.generate(PROMPT, max_new_tokens=4)
    spill, ids = p._spill, p.tokenizer(PROMPT)["input_ids"]
    assert spill.path == cache / "kv-spill" and len([h for h in p.prefix_session().hashes(ids) if h in spill]) == 4
    _fill(disk)
    other = " ".join(f"word{9 + (i * 5) % 200}" for i in range(70))
    with caplog.at_level(logging.WARNING, logger="cache.kvstore"):
        r = p.generate(other, max_new_tokens=4)  # its blocks find no room: skipped by the free-space check
        r2 = p.generate(other + " word3", max_new_tokens=4)
    assert len(r.token_ids) == 4 and len(r2.token_ids) == 4 and spill.skipped >= 4
    (msg,) = [m for m in caplog.messages if "KV spill" in m]
    assert "MiB free" in msg and "not spilled while the disk is full" in msg
    # a write the check lets through fails at commit for real (ENOSPC): that block only is lost
    import cache.store

    monkeypatch.setattr(cache.store, "_free_bytes", lambda path: 1 << 40)
    before = spill.skipped
    third = " ".join(f"word{11 + (i * 3) % 200}" for i in range(100))
    r3 = p.generate(third, max_new_tokens=4)
    assert len(r3.token_ids) == 4 and spill.skipped > before
    first = p.prefix_session().hashes(ids)[0]
    pool = p.prefix_session().pool
    assert spill.enabled and spill.get(first, shape=pool.block_shape, dtype=pool.data.dtype) is not None  # still served
    p.close()


@pytest.fixture
def read_only(tmp_path):
    """A read-only bind mount of ``tmp_path/src`` (root ignores permissions, not a read-only mount)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    _mount("--bind", str(src), str(ro))
    try:
        _mount("-o", "remount,bind,ro", str(ro))
    except BaseException:
        subprocess.run(["umount", "-l", str(ro)], check=False)
        raise
    yield src, ro
    subprocess.run(["umount", "-l", str(ro)], check=False)


@pytest.mark.parametrize("spilled_before", [False, True], ids=["no-spill-yet", "spill-from-when-writable"])
def test_generate_from_a_read_only_cache_spills_to_sli_home(tmp_path, tiny_root, read_only, monkeypatch, spilled_before):
    src, ro = read_only
    _cache(tiny_root, src / "c")
    if spilled_before:
        p = UniversalSLIProcessor(src / "c", **KW)
        p.generate(PROMPT, max_new_tokens=2)
        p.close()
        assert (src / "c" / "kv-spill" / "data.mdb").exists()
    with pytest.raises(OSError):
        (ro / "c" / "probe").touch()
    home = tmp_path / "home"
    r = _generate(ro / "c", home)  # before: a traceback from creating kv-spill
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    (line,) = _spill_lines(r.stderr)
    assert "Read-only file system" in line and f"spilling to {home / 'kv-spill'}" in line, line
    # a later process finds the blocks there
    monkeypatch.setenv("SLI_HOME", str(home))
    p = UniversalSLIProcessor(ro / "c", **KW)
    again = p.generate(PROMPT, max_new_tokens=4)
    assert again.stats.disk_cached_tokens == 64 and p._spill.path.parent == home / "kv-spill"
    p.close()


def _used(path: Path) -> int:
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=2)
    try:
        return (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    finally:
        env.close()


def _blocks_root_page(path: Path) -> tuple[int, int]:
    """(page number, page size) of the root page of the spill's ``blocks`` database, read from
    the main database's record of it (LMDB's MDB_db: the root page number is its last 8 bytes)."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=2)
    try:
        with env.begin() as txn:
            rec = txn.get(b"blocks")
        return int.from_bytes(rec[-8:], "little"), env.stat()["psize"]
    finally:
        env.close()


@pytest.mark.parametrize("damage", ["cut-short", "blocks-page-zeroed"])
def test_a_damaged_spill_file_is_set_aside_and_started_afresh(tmp_path, tiny_root, caplog, damage):
    cache = _cache(tiny_root, tmp_path / "c")
    p = UniversalSLIProcessor(cache, **KW)
    want = p.generate(PROMPT, max_new_tokens=4)
    p.close()
    data = cache / "kv-spill" / "data.mdb"
    used = _used(cache / "kv-spill")
    if damage == "cut-short":  # a copy that stopped
        os.truncate(data, used // 2)
    else:  # a page the next request reads holds zeros: found at the lookup, not when opening
        pgno, psize = _blocks_root_page(cache / "kv-spill")
        with open(data, "r+b") as f:
            f.seek(pgno * psize)
            f.write(b"\0" * psize)
    with caplog.at_level(logging.WARNING, logger="cache.kvstore"):
        p = UniversalSLIProcessor(cache, **KW)
        r = p.generate(PROMPT, max_new_tokens=4)  # before: lmdb.CorruptedError
        r2 = p.generate(PROMPT, max_new_tokens=4)
    assert r.token_ids == want.token_ids == r2.token_ids and r.stats.disk_cached_tokens == 0
    (msg,) = [m for m in caplog.messages if "KV spill" in m]
    assert "damaged" in msg and "set aside as" in msg and str(cache / "kv-spill.damaged") in msg, msg
    assert (cache / "kv-spill.damaged" / "data.mdb").exists() and p._spill.enabled
    p.close()
    p = UniversalSLIProcessor(cache, **KW)  # the fresh store serves the next process
    assert p.generate(PROMPT, max_new_tokens=4).stats.disk_cached_tokens == 64
    p.close()


def test_store_opening_order_and_its_one_line(tmp_path, caplog):
    """Step by step: where the store opens, and what is said."""
    from cache.kvstore import KVSpillStore, open_spill_store

    with caplog.at_level(logging.WARNING, logger="cache.kvstore"):
        s = open_spill_store(tmp_path / "a" / "kv-spill", limit_bytes=1 << 20, fallback=tmp_path / "b")
    assert s.path == tmp_path / "a" / "kv-spill" and not caplog.messages  # where it belongs: nothing said
    assert s.put(b"x" * 16, torch.arange(6.0)) and torch.equal(s.get(b"x" * 16, shape=(6,), dtype=torch.float32), torch.arange(6.0))
    s.close()
    (tmp_path / "file").write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="cache.kvstore"):
        s = open_spill_store(tmp_path / "file" / "kv-spill", limit_bytes=1 << 20, fallback=tmp_path / "b")
        none = open_spill_store(tmp_path / "file" / "kv-spill", limit_bytes=1 << 20, fallback=tmp_path / "file" / "x")
    assert s.path == tmp_path / "b" and none is None
    assert len(caplog.messages) == 2 and "spilling to" in caplog.messages[0] and "spilling is off" in caplog.messages[1]
    s.close()
    # a closed-down store answers like an empty one
    dead = KVSpillStore(tmp_path / "d", limit_bytes=1 << 20)
    dead.close()
    assert not dead.enabled and dead.put(b"y" * 16, torch.ones(2)) is False
    assert dead.get(b"y" * 16, shape=(2,), dtype=torch.float32) is None and b"y" * 16 not in dead
