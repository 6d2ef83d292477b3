"""Lazy model readers: one tensor at a time from safetensors, PyTorch .bin, or GGUF.

No reader ever holds the whole model: safetensors and GGUF are memory-mapped and read per
tensor; .bin checkpoints are opened with ``torch.load(weights_only=True, mmap=True)``, so
their tensors are file-backed until used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from cache.readahead import advise_file

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

_FINGERPRINT_SAMPLE = 1 << 20
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ModelSourceError(ValueError):
    """A model path that is missing, of an unknown layout, or malformed."""


def _load_config(path: Path, **kwargs: Any):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelSourceError(f"cannot read the model config at {path}: {e}") from e


def _file_digest(path: Path) -> str:
    """Hash of a weight file's name, size, first and last MiB: cheap, and changes when the file does."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_SAMPLE))
        if size > _FINGERPRINT_SAMPLE:
            f.seek(max(_FINGERPRINT_SAMPLE, size - _FINGERPRINT_SAMPLE))
            h.update(f.read(_FINGERPRINT_SAMPLE))
    return h.hexdigest()


class ModelSource(ABC):
    """A causal LM on disk, read one tensor at a time.

    Invariant: ``tensor_names()`` lists every tensor ``read`` can return, in file order.
    """

    format: str

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = self._read_config()
        self._fingerprint: str | None = None

    @abstractmethod
    def _read_config(self): ...

    @abstractmethod
    def tensor_names(self) -> list[str]: ...

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """Materialise one tensor on the CPU."""

    @abstractmethod
    def weight_files(self) -> list[Path]: ...

    @abstractmethod
    def tensor_nbytes(self, name: str) -> int:
        """Bytes ``read(name)`` will return, without reading it."""

    def tensor_meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """Shape and dtype name of a tensor (reads it where the format keeps no header)."""
        t = self.read(name)
        return tuple(t.shape), str(t.dtype).removeprefix("torch.")

    def byte_ranges(self, names: list[str]) -> list[tuple[Path, int, int]]:
        """(file, offset, length) of each tensor's bytes on disk, where the format says
        (empty where it does not): what :meth:`read_ahead` asks the kernel for."""
        return []

    def read_ahead(self, names: list[str]) -> int:
        """Ask the kernel to read these tensors' bytes into the page cache now, in large
        reads, so reading them later does not wait page by page; returns the bytes advised."""
        n = 0
        for path, off, length in self.byte_ranges(names):
            fd = os.open(path, os.O_RDONLY)
            try:
                n += advise_file(fd, off, length)
            finally:
                os.close(fd)
        return n

    def tokenizer_files(self) -> dict[str, bytes]:
        """Tokenizer, chat template and generation files to copy into the cache."""
        folder = self.path if self.path.is_dir() else self.path.parent
        return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}

    @property
    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files())

    def config_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        d.pop("transformers_version", None)
        return d

    def fingerprint(self) -> str:
        """Identifies the source model: its config and a digest of every weight file."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.format.encode())
            h.update(json.dumps(self.config_dict(), sort_keys=True, default=str).encode())
            for f in self.weight_files():
                h.update(_file_digest(f).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "disk_bytes": self.disk_bytes}

    def close(self) -> None:
        """Release file handles (readers are mmap-backed)."""


class SafetensorsSource(ModelSource):
    """An HF folder with ``model.safetensors`` or shards listed in ``model.safetensors.index.json``."""

    format = "safetensors"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelSourceError(f"{index} is not a safetensors index ({e})") from e
            self._files = sorted({path / f for f in weight_map.values()})
        else:
            self._files = sorted(path.glob("*.safetensors"))
        missing = [f for f in self._files if not f.is_file()]
        if missing:
            raise ModelSourceError(f"{path}: the index lists missing shards {[m.name for m in missing]}")
        from safetensors import SafetensorError, safe_open

        self._handles = {}
        self._where: dict[str, Any] = {}
        self._file_of: dict[str, Path] = {}
        self._header_offsets: dict[Path, dict[str, tuple[int, int]]] = {}
        for f in self._files:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise ModelSourceError(f"{f} is not a readable safetensors file ({e})") from e
            self._handles[f] = h
            for k in h.keys():
                self._where[k] = h
                self._file_of[k] = f

    def _read_config(self):
        return _load_config(self.path)

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def read(self, name: str) -> torch.Tensor:
        try:
            return self._where[name].get_tensor(name)
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.path}") from None

    def weight_files(self) -> list[Path]:
        return list(self._files)

    def _offsets(self, f: Path) -> dict[str, tuple[int, int]]:
        """Absolute (offset, length) of every tensor in a safetensors file, from its header
        (8-byte little-endian length, then JSON with each tensor's ``data_offsets``)."""
        if f not in self._header_offsets:
            with open(f, "rb") as fh:
                hlen = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(hlen))
            base = 8 + hlen
            self._header_offsets[f] = {
                k: (base + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
                for k, v in header.items()
                if k != "__metadata__"
            }
        return self._header_offsets[f]

    def byte_ranges(self, names: list[str]) -> list[tuple[Path, int, int]]:
        out = []
        for name in names:
            f = self._file_of[name]
            off, length = self._offsets(f)[name]
            out.append((f, off, length))
        return out

    def tensor_nbytes(self, name: str) -> int:
        sl = self._where[name].get_slice(name)
        n = 1
        for d in sl.get_shape():
            n *= d
        return n * _ST_DTYPE_BYTES.get(sl.get_dtype(), 4)

    def tensor_meta(self, name: str) -> tuple[tuple[int, ...], str]:
        sl = self._where[name].get_slice(name)
        return tuple(sl.get_shape()), {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(sl.get_dtype(), sl.get_dtype())

    def close(self) -> None:
        self._handles.clear()
        self._where.clear()


class TorchBinSource(ModelSource):
    """An HF folder with ``pytorch_model.bin`` or shards listed in ``pytorch_model.bin.index.json``."""

    format = "pytorch"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        index = path / "pytorch_model.bin.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelSourceError(f"{index} is not a checkpoint index ({e})") from e
            self._files = sorted({path / f for f in weight_map.values()})
        else:
            self._files = sorted(path.glob("*.bin"))
        self._names: dict[str, Path] = {}
        self._open: dict[Path, dict[str, torch.Tensor]] = {}
        for f in self._files:
            for k in self._load(f):
                self._names[k] = f

    def _load(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._open:
            try:
                # mmap: tensors stay file-backed; weights_only: no code from the checkpoint runs
                sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except FileNotFoundError as e:
                raise ModelSourceError(f"checkpoint shard {f} is missing") from e
            except RuntimeError as e:
                raise ModelSourceError(
                    f"{f} cannot be memory-mapped ({e}); re-save it with torch.save (zip format, torch>=1.6) or as safetensors"
                ) from e
            if not isinstance(sd, dict):
                raise ModelSourceError(f"{f} holds a {type(sd).__name__}, not a state dict")
            self._open[f] = sd
        return self._open[f]

    def _read_config(self):
        return _load_config(self.path)

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def read(self, name: str) -> torch.Tensor:
        try:
            return self._load(self._names[name])[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.path}") from None

    def weight_files(self) -> list[Path]:
        return list(self._files)

    def tensor_nbytes(self, name: str) -> int:
        t = self._load(self._names[name])[name]
        return t.numel() * t.element_size()

    def close(self) -> None:
        self._open.clear()


class GGUFSource(ModelSource):
    """A GGUF file. Tensors are dequantized one at a time (to float32) with gguf-py, then
    renamed and un-permuted with transformers' own GGUF mapping, as ``from_pretrained`` would."""

    format = "gguf"

    def __init__(self, path: Path) -> None:
        try:
            import gguf
            from transformers.modeling_gguf_pytorch_utils import (
                TENSOR_PROCESSORS,
                TensorProcessor,
                get_gguf_hf_weights_map,
                load_gguf_checkpoint,
            )
        except ImportError as e:
            raise ModelSourceError(f"reading GGUF needs the `gguf` package: pip install 'gguf>=0.10' ({e})") from e
        super().__init__(path)
        from transformers import AutoModelForCausalLM

        try:
            self._reader = gguf.GGUFReader(str(path))
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        except (ValueError, OSError) as e:
            raise ModelSourceError(f"{path} is not a readable GGUF file ({e})") from e
        arch = parsed["config"].get("model_type")
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
        self._parsed = {**parsed, "tensors": {}}
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config)
        mapping = get_gguf_hf_weights_map(skeleton, self._processor)
        self._tensors = {}
        for t in self._reader.tensors:
            if t.name in mapping:
                self._tensors[mapping[t.name]] = t
            else:
                logger.debug("GGUF tensor %s has no transformers counterpart; skipped", t.name)

    def _read_config(self):
        return _load_config(self.path.parent, gguf_file=self.path.name)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def read(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        try:
            t = self._tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.path}") from None
        weights = dequantize(t.data, t.tensor_type)
        result = self._processor.process(weights=weights, name=t.name, tensor_key_mapping={}, parsed_parameters=self._parsed)
        return torch.from_numpy(np.array(result.weights, dtype=np.float32))  # a copy: the reader is a read-only memmap

    def weight_files(self) -> list[Path]:
        return [self.path]

    def tensor_nbytes(self, name: str) -> int:
        return int(self._tensors[name].n_elements) * 4  # dequantized to float32

    def tokenizer_files(self) -> dict[str, bytes]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            return {n: (Path(tmp) / n).read_bytes() for n in os.listdir(tmp) if (Path(tmp) / n).is_file()}


def open_source(path: str | os.PathLike[str]) -> ModelSource:
    """Open a model folder (safetensors or .bin) or a GGUF file.

    Raises:
        ModelSourceError: nothing there, an unknown layout, or a malformed file; the message
            says what was expected.
    """
    p = Path(path).expanduser()
    expected = "a folder with config.json and *.safetensors or *.bin weights, or a .gguf file"
    if not p.exists():
        raise ModelSourceError(f"no model at {p}: expected {expected} (the real test model: `sli fetch-model`)")
    if p.is_file():
        if p.suffix == ".gguf":
            return GGUFSource(p)
        raise ModelSourceError(f"{p} is a file but not a .gguf; expected {expected}")
    if (p / "config.json").is_file():
        try:
            json.loads((p / "config.json").read_text())
        except ValueError as e:
            raise ModelSourceError(f"{p / 'config.json'} is not valid JSON ({e})") from e
        if any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file():
            return SafetensorsSource(p)
        if any(p.glob("*.bin")) or (p / "pytorch_model.bin.index.json").is_file():
            return TorchBinSource(p)
        raise ModelSourceError(f"{p} has config.json but no *.safetensors or *.bin weights")
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFSource(ggufs[0])
    if len(ggufs) > 1:
        raise ModelSourceError(f"{p} holds several GGUF files {[g.name for g in ggufs]}; pass one of them")
    raise ModelSourceError(f"{p} has no config.json and no .gguf file; expected {expected}")
