"""Token ids to text while they are generated, and stop strings.

The detokenizing is tokenizers' own streaming decoder (:class:`tokenizers.decoders.DecodeStream`):
it holds back a token that ends inside a multi-byte character and handles byte-fallback and
leading-space rules of each tokenizer family. What is written here is the stop-string logic:
text that could be the start of a stop string is held back until it is known not to be one,
and a stop string is never part of the text.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenizers.decoders import DecodeStream


def cut_at_stop(text: str, stop: list[str] | tuple[str, ...] | None) -> str:
    """``text`` up to the first stop string, if any appears."""
    if not stop:
        return text
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def stop_checker(tokenizer, stop: list[str] | None) -> Callable[[int, list[int]], bool] | None:
    """A ``should_stop(row, generated ids)`` for batched generation: true once a stop string
    appears in the decoded tail (only the tail can hold one that just appeared)."""
    if not stop:
        return None
    longest = max(len(s) for s in stop)

    def should_stop(row: int, ids: list[int]) -> bool:
        tail = tokenizer.decode(ids[-(longest + 8) :], skip_special_tokens=True)
        return any(s in tail for s in stop)

    return should_stop


class TextStream:
    """Feed generated token ids one at a time; get back the text that is safe to show.

    Args:
        tokenizer: a transformers fast tokenizer (its ``backend_tokenizer`` drives the decoder).
        stop: stop strings; the text ends before the first one and never shows part of one.

    Raises:
        TypeError: the tokenizer is a slow (Python) tokenizer, which has no streaming decoder.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(
                f"{type(tokenizer).__name__} is a slow tokenizer; streaming needs a fast one "
                "(transformers' AutoTokenizer with use_fast=True, or tokenizer.json in the model folder)"
            )
        self._backend = backend
        self._tokenizer = tokenizer
        self._decoder = DecodeStream(skip_special_tokens=True)
        self.stop = list(stop or [])
        self._hold = max((len(s) for s in self.stop), default=0)
        self.text = ""  # everything decoded so far
        self.emitted = ""  # what has been handed out
        self.stopped = False  # a stop string appeared

    def push(self, token_id: int) -> str:
        """Add one generated token; return the new text that can be shown (maybe empty)."""
        piece = self._decoder.step(self._backend, int(token_id))
        if piece:
            self.text += piece
        cut = cut_at_stop(self.text, self.stop)
        self.stopped = cut != self.text
        # hold back what could still become a stop string
        ready = len(cut) if self.stopped or not self._hold else max(len(self.emitted), len(cut) - self._hold)
        return self._emit(cut[:ready])

    def finish(self, token_ids: list[int]) -> str:
        """At the end: the rest of the text (what was held back), checked against a plain
        decode of all the ids."""
        full = cut_at_stop(self._tokenizer.decode(token_ids, skip_special_tokens=True), self.stop)
        return self._emit(full) if full.startswith(self.emitted) else ""

    def _emit(self, upto: str) -> str:
        new = upto[len(self.emitted) :] if upto.startswith(self.emitted) else ""
        self.emitted += new
        return new
