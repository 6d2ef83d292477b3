"""What calibration is given: the method, the text, and how it is cut into samples.

A :class:`CalibrationConfig` rides on a plan (``QuantizationConfig(calibration=...)``,
``AdaptiveQuantizer(calibration=...)``) and is part of its fingerprint: the method, the
text's SHA-256, the number of samples, their length and the method's options, so a calibrated
and an uncalibrated cache (or two calibrated on different text) never mix. The text's path is
kept for the record but is not part of the fingerprint (the hash is).

The default text ships with sli (``sli/data/calibration.txt``): docstrings of CPython's
standard library (PSF License 2.0, see ``sli/data/NOTICE``), never the pydoc topics that
``sli validate`` and ``sli bench --quality`` score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import torch

DEFAULT_TEXT_NAME = "sli/data/calibration.txt"
HOLDOUT_TOKENS = 4096  # what a loss target holds out of the text unless told


class CalibrationMethod(str, Enum):
    """How calibration activations are used."""

    GPTQ = "gptq"  # GPTQ: each weight rounded column by column, the error pushed onto the columns left
    AWQ = "awq"  # activation-aware per-channel scales, folded into the preceding norm or linear; then round to nearest
    AWQ_GPTQ = "awq+gptq"  # the scales first, then GPTQ on the scaled weights
    RTN = "rtn"  # round to nearest on importance-weighted grids: statistics only, no weight update

    @property
    def gptq(self) -> bool:
        return self in (CalibrationMethod.GPTQ, CalibrationMethod.AWQ_GPTQ)

    @property
    def awq(self) -> bool:
        return self in (CalibrationMethod.AWQ, CalibrationMethod.AWQ_GPTQ)


def default_text_path() -> Path:
    """The calibration text that ships with sli."""
    return Path(str(resources.files("sli") / "data" / "calibration.txt"))


def read_text(path: str | os.PathLike[str] | None) -> str:
    """The calibration text: a plain text file, or JSON lines with a ``text`` field
    (``.jsonl``/``.json`` files, or any file whose first line is a JSON object).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a JSON line without a ``text`` string, or no text at all.
    """
    p = default_text_path() if path is None else Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"calibration text {p} does not exist; give --calibration-text FILE (plain text or JSONL with a 'text' field)")
    raw = p.read_text(encoding="utf-8")
    first = raw.lstrip().split("\n", 1)[0].strip()
    if p.suffix in (".jsonl", ".json") or (first.startswith("{") and first.endswith("}")):
        texts = []
        for k, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{p}, line {k}: not JSON ({e}); JSONL calibration files hold one object with a 'text' field per line") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{p}, line {k}: no 'text' string field; JSONL calibration files hold {{\"text\": ...}} per line")
            texts.append(obj["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise ValueError(f"calibration text {p} is empty")
    return raw


def text_sha256(path: str | os.PathLike[str] | None) -> str:
    return hashlib.sha256(read_text(path).encode("utf-8")).hexdigest()


@dataclass
class CalibrationConfig:
    """Calibrated quantization: which method, on which text, cut how.

    Attributes:
        method: ``gptq``, ``awq`` or ``awq+gptq`` (:class:`CalibrationMethod`).
        text: a text file (plain, or JSONL with a ``text`` field); None: the text that ships
            with sli (stdlib docstrings).
        samples: sequences of ``seqlen`` tokens taken from the text (evenly spaced, not overlapping).
        seqlen: tokens per sample.
        holdout_tokens: tokens at the end of the text kept out of the samples, on which a loss
            target (``--target-loss``) is measured (a loss target holds out ``HOLDOUT_TOKENS``
            when this is 0).
        act_order: GPTQ quantizes columns in order of decreasing activation energy (the
            groups stay the stored, contiguous ones: "static groups"). On by default: on the
            real model, int4 groups of 64, 16 x 512 samples: +8.98% perplexity with it, +12.40%
            without (held-out pydoc text; round to nearest +31.0%).
        damp: GPTQ dampening, a share of the Hessian's mean diagonal added to its diagonal.
        block_size: GPTQ's lazy-update block (columns).
        true_sequential: inside a layer, the attention output and MLP projections take
            their statistics after the projections before them are quantized.
        awq_grid: points of AWQ's grid over the exponent of the activation scale.
        awq_samples: samples AWQ's search scores each grid point on (the first ones; its
            20-point search per scale point costs about 25 layer passes over them).
        importance: each group's scale and offset chosen by the error weighted with the mean
            square of its input channels (:mod:`cache.wgrid`, llama.cpp's importance matrix),
            by round to nearest and by GPTQ's groups; False: the plain min/max grid.
        awq_duo: AWQ's "duo scaling" (activations and weights set the scales; AutoAWQ's and
            llm-compressor's default); False: activations only.
        text_sha256: the text's hash (computed from ``text`` when not given).
    """

    method: CalibrationMethod = CalibrationMethod.GPTQ
    text: str | None = None
    samples: int = 128
    seqlen: int = 512
    holdout_tokens: int = 0
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = False
    awq_grid: int = 20
    awq_samples: int = 8
    awq_duo: bool = True
    importance: bool = True
    text_sha256: str | None = None

    def __post_init__(self) -> None:
        try:
            self.method = CalibrationMethod(self.method)
        except ValueError:
            raise ValueError(f"unknown calibration method {self.method!r}; choose one of {[m.value for m in CalibrationMethod]}") from None
        for name in ("samples", "seqlen", "block_size", "awq_grid", "awq_samples"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"calibration {name} must be positive, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise ValueError(f"calibration seqlen must be at least 2 tokens, got {self.seqlen}")
        if self.holdout_tokens < 0:
            raise ValueError(f"holdout_tokens must be >= 0, got {self.holdout_tokens}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if self.text is not None:
            self.text = str(self.text)
        if self.text_sha256 is None:
            self.text_sha256 = text_sha256(self.text)

    @property
    def text_name(self) -> str:
        return self.text if self.text is not None else DEFAULT_TEXT_NAME

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = self.method.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CalibrationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CalibrationConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def fingerprint_dict(self) -> dict[str, Any]:
        """What a calibrated cache depends on: everything but the text's path."""
        return {k: v for k, v in self.to_dict().items() if k != "text"}

    def describe(self) -> str:
        return (f"{self.method.value} on {self.text_name} (sha256 {self.text_sha256[:12]}), "
                f"{self.samples} x {self.seqlen} tokens" + (", act-order" if self.act_order else "")
                + (", importance-weighted grids" if self.importance else ""))


@dataclass(frozen=True)
class CalibrationSet:
    """Token ids cut from the calibration text: ``samples`` ``[N, L]`` and the held-out ``holdout`` ``[M]``."""

    samples: torch.Tensor
    holdout: torch.Tensor


def calibration_set(cfg: CalibrationConfig, tokenizer) -> CalibrationSet:
    """Tokenize the text and cut it: the last ``holdout_tokens`` tokens are held out; the
    samples are ``samples`` windows of ``seqlen`` tokens, evenly spaced over the rest without
    overlapping.

    Raises:
        ValueError: the text is too short for the samples asked, or its hash is not the
            config's (the file changed since the plan was made).
    """
    text = read_text(cfg.text)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != cfg.text_sha256:
        raise ValueError(
            f"calibration text {cfg.text_name} has sha256 {digest[:12]}, the plan was made with {cfg.text_sha256[:12]}; "
            "the file changed: give the text the plan names, or make the plan again"
        )
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    need = cfg.samples * cfg.seqlen + cfg.holdout_tokens
    if ids.numel() < need:
        raise ValueError(
            f"calibration text {cfg.text_name} has {ids.numel()} tokens, fewer than the {need} asked "
            f"({cfg.samples} samples x {cfg.seqlen} + {cfg.holdout_tokens} held out); give a longer text or fewer samples"
        )
    body, holdout = ids[: ids.numel() - cfg.holdout_tokens], ids[ids.numel() - cfg.holdout_tokens :]
    span = body.numel() - cfg.seqlen
    starts = [0] if cfg.samples == 1 else [k * span // (cfg.samples - 1) for k in range(cfg.samples)]
    samples = torch.stack([body[s : s + cfg.seqlen] for s in starts])  # [N, L]
    return CalibrationSet(samples=samples, holdout=holdout)
