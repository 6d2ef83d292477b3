"""`ChatSession`: a conversation over a processor, with the model's chat template and KV reuse.

Every turn is the whole conversation templated again; because the paged KV cache is keyed
by token prefix, the system prompt and earlier turns are found in the pool (or on disk) and
only the new message, plus the tail of the last partial block, is prefilled.
"""

from __future__ import annotations

from collections.abc import Iterator

from runtime.generate import GenerationOutput, GenerationResult


class ChatSession:
    """History plus a processor. Not thread-safe."""

    def __init__(self, processor, *, system_prompt: str | None = None, messages: list[dict] | None = None) -> None:
        self.processor = processor
        self.system_prompt = system_prompt
        self.messages: list[dict] = list(messages or [])
        self.last: GenerationOutput | None = None

    def reset(self) -> None:
        """Forget the history (the cached KV stays in the pool and on disk for reuse)."""
        self.messages = []
        self.last = None

    def _ids(self) -> list[int]:
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + self.messages
        self.processor.load()
        tok = self.processor.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use generate() with plain text")
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def stream(self, text: str, **kwargs) -> Iterator[str]:
        """Send a user message; yield the answer as it is produced. The answer joins the
        history when it ends, also when the caller stops early (Ctrl-C keeps the part said)."""
        self.messages.append({"role": "user", "content": text})
        out = kwargs.pop("out", None) or GenerationOutput()
        self.last = out
        pieces: list[str] = []
        try:
            for piece in self.processor.stream(self._ids(), out=out, **kwargs):
                pieces.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def send(self, text: str, **kwargs):
        """Send a user message and return a result like ``generate``'s."""
        out = GenerationOutput()
        reply = "".join(self.stream(text, out=out, **kwargs))
        return GenerationResult(text=reply, token_ids=out.token_ids, stats=out.stats, texts=[reply])
