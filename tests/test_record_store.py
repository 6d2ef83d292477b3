"""Layer 1-2: records (checksums, truncation, versions) and the LMDB store (groups,
manifest, map growth, corrupt records, concurrent readers)."""

import json
import struct
import subprocess
import sys
import textwrap
import zlib

import lmdb
import pytest
import torch

from cache import (
    CacheFormatError,
    CacheMismatchError,
    CodecName,
    CorruptRecordError,
    GroupEntry,
    LayerStore,
    Manifest,
    TensorEntry,
    VariantNotFoundError,
    decode_record,
    decode_tensor,
    encode_record,
    get_codec,
)
from cache.record import RECORD_FORMAT_VERSION
from cache.manifest import STORE_FORMAT_VERSION


def _enc(codec=CodecName.NF4, rows=64, cols=128, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return w, get_codec(codec).encode(w)


@pytest.mark.parametrize("codec", list(CodecName))
def test_record_round_trip_is_bit_exact(codec):
    w, enc = _enc(codec)
    rec, info = encode_record(enc, compress_level=3)
    back = decode_record("k", rec)
    assert back.codec == enc.codec and back.shape == enc.shape and back.params == enc.params
    assert all(torch.equal(back.parts[k], enc.parts[k]) for k in enc.parts)
    assert torch.equal(decode_tensor(back), decode_tensor(enc))
    assert info.raw_len == enc.nbytes


def test_zstd_kept_only_where_it_pays():
    # bf16 weights save ~20%: below the default quarter, so kept raw (faster to stream),
    # unless the caller asks for any saving; a sparse tensor saves far more and is compressed
    w = (torch.randn(512, 512, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    _, raw_info = encode_record(get_codec(CodecName.RAW).encode(w))
    assert not raw_info.compressed
    _, eager = encode_record(get_codec(CodecName.RAW).encode(w), min_saving=0.05)
    assert eager.compressed and eager.stored_len < 0.9 * eager.raw_len
    sparse = w.clone()
    sparse[:, 64:] = 0
    _, sparse_info = encode_record(get_codec(CodecName.RAW).encode(sparse))
    assert sparse_info.compressed and sparse_info.stored_len < 0.5 * sparse_info.raw_len
    rnd = torch.randint(0, 256, (256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    _, rnd_info = encode_record(get_codec(CodecName.RAW).encode(rnd))
    assert not rnd_info.compressed and rnd_info.stored_len == rnd_info.raw_len
    _, off = encode_record(get_codec(CodecName.RAW).encode(w), compress_level=0)
    assert not off.compressed


def test_flipped_payload_byte_is_caught():
    _, enc = _enc()
    rec = bytearray(encode_record(enc)[0])
    rec[-10] ^= 0x01
    with pytest.raises(CorruptRecordError, match="payload checksum mismatch"):
        decode_record("layer.0/q", bytes(rec))


def test_flipped_header_byte_is_caught():
    _, enc = _enc()
    rec = bytearray(encode_record(enc)[0])
    rec[20] ^= 0x01
    with pytest.raises(CorruptRecordError, match="header checksum mismatch"):
        decode_record("k", bytes(rec))


@pytest.mark.parametrize("cut", [0, 5, 30, -1])
def test_truncated_record_is_caught(cut):
    _, enc = _enc()
    rec = encode_record(enc)[0]
    short = rec[:cut] if cut >= 0 else rec[:-1]
    with pytest.raises(CorruptRecordError, match="truncated"):
        decode_record("k", short)


def test_bad_magic_and_other_format_version():
    _, enc = _enc()
    rec = bytes(encode_record(enc)[0])
    with pytest.raises(CorruptRecordError, match="bad magic"):
        decode_record("k", b"XXXX" + rec[4:])
    # forge a record of a future format, with valid checksums
    hlen = struct.unpack_from("<I", rec, 4)[0]
    header = json.loads(rec[12 : 12 + hlen])
    header["v"] = RECORD_FORMAT_VERSION + 1
    hb = json.dumps(header).encode()
    forged = b"SLIR" + struct.pack("<II", len(hb), zlib.crc32(hb)) + hb + rec[12 + hlen :]
    with pytest.raises(CacheFormatError, match="rebuild the cache"):
        decode_record("k", forged)


def _group(name, names):
    return GroupEntry(
        name=name,
        tensors=[TensorEntry(n, name, "nf4", [64, 128], "bfloat16", 64 * 128 * 2, 100, 90, True, 0.01, 0.1) for n in names],
    )


def _manifest(vid, groups, model_fp="m1"):
    return Manifest(
        variant_id=vid,
        model_fingerprint=model_fp,
        quant_fingerprint="q1",
        library_version="test",
        model_type="llama",
        source={"path": "x", "format": "safetensors"},
        config={},
        quantization={"mode": "nf4", "kind": "config"},
        tokenizer_files=[],
        groups=groups,
        arch={},
    )


def test_store_groups_manifest_and_variants(tmp_path):
    _, enc = _enc()
    rec = encode_record(enc)[0]
    with LayerStore(tmp_path / "c") as st:
        st.begin_variant("v1", {"model_fingerprint": "m1"})
        st.put_group("v1", _group("layer.0", ["a", "b"]), {"a": rec, "b": rec})
        assert st.get_group("v1", "layer.0").tensors[1].name == "b"
        assert st.get_group("v1", "layer.1") is None
        assert st.list_variants() == []  # no manifest yet: unfinished
        with pytest.raises(VariantNotFoundError, match="not complete"):
            st.require_manifest("v1")
        st.put_manifest(_manifest("v1", [st.get_group("v1", "layer.0")]))
        assert st.list_variants() == ["v1"]
        m = st.require_manifest("v1", model_fingerprint="m1")
        assert m.groups[0].tensors[0].codec == "nf4"
        with pytest.raises(CacheMismatchError, match="built from model m1, not other"):
            st.require_manifest("v1", model_fingerprint="other")
        with pytest.raises(CacheMismatchError, match="started from model m1"):
            st.begin_variant("v1", {"model_fingerprint": "m2"})
        got = st.get_record("v1", "a")
        assert all(torch.equal(got.parts[k], enc.parts[k]) for k in enc.parts)
        with pytest.raises(VariantNotFoundError, match="no record"):
            st.get_record("v1", "zzz")
        st.delete_variant("v1")
        assert st.list_variants() == [] and st.raw_record("v1", "a") is None


def test_map_grows_instead_of_map_full(tmp_path, monkeypatch):
    # the map is 1 TiB of address space; capped (as an address-space limit caps it) it must grow
    monkeypatch.setattr("cache.envs.MAP_BYTES", 8 << 20)
    with LayerStore(tmp_path / "c") as st:
        assert st.map_size < 64 << 20
        start = st.map_size
        big = bytes(range(256)) * (1 << 12)  # 1 MiB, incompressible enough
        for i in range(int(1.5 * start / len(big))):
            st.put_group("v", _group(f"layer.{i}", []), {f"t{i}": big})
        assert st.map_size > start
        assert st.raw_record("v", "t0") == big


def test_corrupt_record_in_store_is_never_served(tmp_path):
    _, enc = _enc()
    rec = bytearray(encode_record(enc)[0])
    with LayerStore(tmp_path / "c") as st:
        st.put_group("v", _group("layer.0", ["a"]), {"a": bytes(rec)})
    # corrupt the stored bytes behind the store's back
    env = lmdb.open(str(tmp_path / "c"), max_dbs=4)
    db = env.open_db(b"tensors")
    with env.begin(write=True, db=db) as txn:
        rec[len(rec) // 2] ^= 0xFF
        txn.put(b"v/a", bytes(rec))
    env.close()
    with LayerStore(tmp_path / "c", readonly=True) as st:
        with pytest.raises(CorruptRecordError, match=r"record 'v/a' in cache .* is corrupt: payload checksum mismatch\. Rebuild"):
            st.get_record("v", "a")


def test_store_format_mismatch_and_missing(tmp_path):
    """A cache of another format is refused with the commands that rebuild each of its variants."""
    with LayerStore(tmp_path / "c") as st:
        old_manifest = {"source": {"path": "/models/my model"}, "quantization": {"kind": "config", "mode": "int4", "group_size": 32}}
        st._write({
            (st._meta, b"format"): json.dumps({"store_format_version": 2}).encode(),
            (st._meta, b"variant/abc/manifest"): json.dumps(old_manifest).encode(),
        })
    with pytest.raises(CacheFormatError, match=rf"store format 2, this sli reads format {STORE_FORMAT_VERSION}\. Rebuild it: rm -r "
                       rf".*/c && sli quantize '/models/my model' --mode int4 --group-size 32 --cache .*/c$"):
        LayerStore(tmp_path / "c", readonly=True)
    with pytest.raises(CacheFormatError, match="store format 2"):
        LayerStore(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no sli cache at"):
        LayerStore(tmp_path / "nothing", readonly=True)


def test_two_reader_processes_at_once(tmp_path):
    cache = tmp_path / "c"
    records = {}
    with LayerStore(cache) as st:
        for i in range(40):
            _, enc = _enc(CodecName.INT4_GROUP, rows=128, cols=256, seed=i)
            records[f"t{i}"] = encode_record(enc)[0]
        st.put_group("v", _group("layer.0", list(records)), records)
        st.put_manifest(_manifest("v", [_group("layer.0", list(records))]))
    reader = textwrap.dedent(
        f"""
        import sys, torch
        from cache import LayerStore, decode_tensor
        with LayerStore({str(cache)!r}, readonly=True) as st:
            total = 0.0
            for _ in range(5):
                for name, enc in st.iter_records("v"):
                    total += float(decode_tensor(enc, torch.float32).sum())
        print(repr(total))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and float(outs[0]) != 0.0


def test_stores_on_one_directory_share_the_environment(tmp_path):
    _, enc = _enc()
    rec = encode_record(enc)[0]
    w = LayerStore(tmp_path / "c")
    r = LayerStore(tmp_path / "c", readonly=True)  # a reader beside a writer, same process
    w.put_group("v", _group("layer.0", ["a"]), {"a": rec})
    assert r.raw_record("v", "a") == rec
    w.close()
    assert r.raw_record("v", "a") == rec  # still open for the reader
    r.close()
    r1 = LayerStore(tmp_path / "c", readonly=True)  # opened read-only first: a writer still joins
    r2 = LayerStore(tmp_path / "c", readonly=True)
    with r1.reader() as rr:  # a record used in place while the writer adds another variant
        held = rr.get("v", "a")
        with LayerStore(tmp_path / "c") as w2:
            w2.put_group("v2", _group("layer.0", ["a"]), {"a": rec})
        assert all(torch.equal(held.parts[k], enc.parts[k]) for k in enc.parts)
    with pytest.raises(PermissionError, match="open read-only"):
        r1.put_meta({"x": 1})  # read-only is the store's, not the shared environment's
    r1.close()
    assert r2.raw_record("v", "a") == rec and r2.raw_record("v2", "a") == rec
    r2.close()
    with LayerStore(tmp_path / "c") as again:  # all closed: a writer may open it
        assert again.raw_record("v", "a") == rec


def test_reopening_does_not_grow_the_map(tmp_path):
    with LayerStore(tmp_path / "c") as st:
        st.put_files("m", {"a": b"x" * 1000})
    sizes = []
    for _ in range(6):
        with LayerStore(tmp_path / "c") as st:
            sizes.append((tmp_path / "c" / "data.mdb").stat().st_size)
    assert len(set(sizes)) == 1, sizes
