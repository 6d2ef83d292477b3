"""Load a variant's tokenizer from the files its manifest stored in the cache."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cache.manifest import Manifest
from cache.store import LayerStore


def load_tokenizer(store: LayerStore, manifest: Manifest):
    """The transformers tokenizer saved with the model (no network, no source model needed).

    Raises:
        ValueError: the cache holds no tokenizer files for this model.
    """
    from transformers import AutoTokenizer

    if not manifest.tokenizer_files:
        raise ValueError(
            f"variant {manifest.variant_id} has no tokenizer files (the source {manifest.source.get('path')} had none); "
            "pass token ids instead of text"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name in manifest.tokenizer_files:
            (Path(tmp) / name).write_bytes(store.get_file(manifest.model_fingerprint, name))
        return AutoTokenizer.from_pretrained(tmp)
