"""`ChatSession`: a conversation over a processor, with the model's chat template and KV reuse.

Every turn is the whole conversation templated again; because the paged KV cache is keyed
by token prefix, the system prompt and earlier turns are found in the pool (or on disk) and
only the new message, plus the tail of the last partial block, is prefilled.

A conversation longer than the context the budget reserves keeps going: the system prompt
stays, and the oldest turns (a user message with the answers that follow it) leave the
history until the prompt plus the answer's tokens fit, as llama.cpp and Ollama do; the first
time, it is said. A turn that fails leaves the history as it was before it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from runtime.generate import GenerationOutput, GenerationResult

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 64


class ChatSession:
    """History plus a processor. Not thread-safe.

    Attributes:
        messages: the turns the model sees (oldest ones leave when the context is full).
        dropped_turns: how many turns left the history to fit the context.
    """

    def __init__(self, processor, *, system_prompt: str | None = None, messages: list[dict] | None = None) -> None:
        self.processor = processor
        self.system_prompt = system_prompt
        self.messages: list[dict] = list(messages or [])
        self.last: GenerationOutput | None = None
        self.dropped_turns = 0
        self._said_dropping = False

    def reset(self) -> None:
        """Forget the history (the cached KV stays in the pool and on disk for reuse)."""
        self.messages = []
        self.last = None

    def _ids(self, messages: list[dict]) -> list[int]:
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + messages
        self.processor.load()
        tok = self.processor.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use generate() with plain text")
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def context_tokens(self, *, prefix_cache: bool = True) -> int:
        """Tokens a turn's prompt plus its answer may take: the KV the budget reserves (as whole
        blocks of the paged pool when it is used) and the model's own context."""
        model = self.processor.load()
        limit = model.context_tokens
        if prefix_cache:
            pool = self.processor.prefix_session().pool
            limit = min(limit, pool.num_blocks * pool.block_size)
        ctx = getattr(model.config, "max_position_embeddings", None)
        return min(limit, ctx) if ctx else limit

    def fit(self, messages: list[dict], max_new_tokens: int, *, prefix_cache: bool = True) -> tuple[list[dict], list[int], int]:
        """The latest turns of ``messages`` (ending with the new user message) whose prompt, with
        the system prompt (and any system messages the history starts with), leaves
        ``max_new_tokens`` in the context; that prompt's ids; and how many turns were left out.

        Raises:
            ValueError: even the system prompt and the new message alone leave too little room.
        """
        limit = self.context_tokens(prefix_cache=prefix_cache)
        pinned = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
        start = pinned
        ids = self._ids(messages)
        while len(ids) + max_new_tokens > limit:
            # the next turn starts at the next user message; the new message always stays
            nxt = next((i for i in range(start + 1, len(messages) - 1) if messages[i]["role"] == "user"), len(messages) - 1)
            if nxt == start:
                raise ValueError(
                    f"chat: the system prompt and this message take {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                    f"they need {len(ids) + max_new_tokens} of the {limit} tokens of context the budget reserves. Shorten the "
                    "message or the system prompt, ask for fewer new tokens, or raise the memory budget or context_tokens"
                )
            start = nxt
            ids = self._ids(messages[:pinned] + messages[start:])
        dropped = sum(1 for m in messages[pinned:start] if m["role"] == "user") or (1 if start > pinned else 0)
        if dropped:
            say = logger.debug if self._said_dropping else logger.warning
            self._said_dropping = True
            say("chat: the conversation outgrew the %d tokens of context the budget reserves; the oldest %d turn(s) "
                "left the history (the system prompt stays) so that %d prompt + %d new tokens fit. A larger memory budget "
                "or context_tokens keeps more", limit, dropped, len(ids), max_new_tokens)
        return messages[:pinned] + messages[start:], ids, dropped

    def stream(self, text: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **kwargs) -> Iterator[str]:
        """Send a user message; yield the answer as it is produced. The answer joins the
        history when it ends, also when the caller stops early (Ctrl-C keeps the part said);
        a turn that fails leaves the history as it was.

        Raises:
            ValueError: the system prompt and the message leave no room for the answer.
        """
        out = kwargs.pop("out", None) or GenerationOutput()
        history, ids, dropped = self.fit([*self.messages, {"role": "user", "content": text}], max_new_tokens,
                                         prefix_cache=kwargs.get("prefix_cache", True))
        self.last = out
        pieces: list[str] = []

        def commit() -> None:
            self.messages = [*history, {"role": "assistant", "content": "".join(pieces)}]
            self.dropped_turns += dropped

        answer = self.processor.stream(ids, out=out, max_new_tokens=max_new_tokens, **kwargs)
        try:
            for piece in answer:
                pieces.append(piece)
                yield piece
        except Exception:
            raise  # a turn that failed: the history stays as it was before it
        except BaseException:
            commit()  # stopped by the caller (the generator closed, Ctrl-C): the part said joins the history
            raise
        finally:
            answer.close()  # its KV is filed in the pool now, before the next turn looks for it
        commit()

    def send(self, text: str, **kwargs):
        """Send a user message and return a result like ``generate``'s."""
        out = GenerationOutput()
        reply = "".join(self.stream(text, out=out, **kwargs))
        return GenerationResult(text=reply, token_ids=out.token_ids, stats=out.stats, texts=[reply])
