"""A broken file is an error that names what is wrong and the fix, never a crash (SIGBUS):
a data file cut short, and a disk that fills up while quantizing (which then resumes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cache import LayerStore
from cache.errors import DiskFullError, TruncatedCacheError
from conftest import make_tiny_model
from sli import QuantizationConfig, UniversalSLIProcessor

SLI = [sys.executable, "-m", "sli.cli"]
ROOT = Path(__file__).resolve().parents[1]


def _sli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SLI, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _used_bytes(cache: Path) -> int:
    import lmdb

    env = lmdb.open(str(cache), readonly=True, lock=False, max_dbs=4)
    try:
        return (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    finally:
        env.close()


def test_a_cache_cut_short_is_an_error_not_a_bus_error(tmp_path, tiny_root):
    path = make_tiny_model(tiny_root, "llama", layers=3, seed=41, hidden=128)
    cache = tmp_path / "c"
    UniversalSLIProcessor(path, quantization_config="int8_dynamic", cache_dir=cache, progress=False).quantize()
    used = _used_bytes(cache)
    os.truncate(cache / "data.mdb", used // 2)  # a partial copy
    with pytest.raises(TruncatedCacheError, match=rf"data.mdb is {used // 2} bytes but its environment uses {used} bytes"):
        LayerStore(cache, readonly=True)
    with pytest.raises(TruncatedCacheError, match="Copy the cache again, or delete it"):
        LayerStore(cache)  # nor for writing: the writer would extend the hole with zeros
    for args in (("inspect", str(cache), "--verify"), ("generate", str(cache), "--mode", "int8_dynamic", "--prompt", "word5 word6")):
        r = _sli(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr[-2000:])  # not -7 / 135 (SIGBUS)
        assert "was cut short" in r.stderr and f"{used // 2} bytes" in r.stderr
    os.truncate(cache / "data.mdb", 1000)  # not even the meta pages
    r = _sli("inspect", str(cache), "--verify")
    assert r.returncode == 2 and "not a readable LMDB environment" in r.stderr, r.stderr[-2000:]


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs (root only; the test says so when the host forbids mounting)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): the disk-full path is covered only where root may mount")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_quantizing_onto_a_full_disk_stops_with_the_numbers_and_resumes(tmp_path, tiny_root, small_disk):
    # ~24 MB of bf16 weights: more than the 40 MiB disk holds beside the 32 MiB margin
    path = make_tiny_model(tiny_root, "llama", layers=6, seed=42, hidden=512, vocab=2048)
    cache = small_disk / "c"
    r = _sli("quantize", str(path), "--mode", "none", "--cache", str(cache))
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "MiB free; writing record" in r.stderr and "the same command resumes" in r.stderr, r.stderr[-2000:]
    with pytest.raises(DiskFullError, match=r"has \d+\.\d MiB free; writing .* needs \d+\.\d MiB plus a 32 MiB margin"):
        UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode="none"), cache_dir=cache, progress=False).quantize()
    with LayerStore(cache, readonly=True) as st:
        assert st.list_variants() == []  # unfinished
        (vid,) = _source_vids(st)
        done = [g for g in ("embed", *(f"layer.{i}" for i in range(6)), "head") if st.get_group(vid, g) is not None]
    assert done, "the groups written before the disk filled are kept"
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    rep = UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode="none"), cache_dir=cache, progress=False).quantize()
    assert rep.resumed_groups == len(done) and rep.built_groups == 8 - len(done)


def _source_vids(st: LayerStore) -> list[str]:
    with st.env.begin(db=st._meta) as txn:
        return [k.decode().split("/")[1] for k, _ in txn.cursor() if k.endswith(b"/source")]
