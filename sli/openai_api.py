"""OpenAI's API shapes for the server: request bodies turned into engine requests, engine
outputs turned into responses and stream chunks, errors into OpenAI's error body.

Parsing checks only what belongs to the HTTP API (the body's keys and their types, ``n``,
``echo``, the messages); every generation parameter is checked by the one validation all of
sli's entry points use (:class:`runtime.generate.SamplingConfig`, :func:`~runtime.generate.check_stop`,
:meth:`runtime.engine.EngineCore.check`), whose :class:`~runtime.generate.InvalidRequestError`
becomes a 400 naming the parameter. Nothing here touches torch.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from runtime.engine import EngineRequest, RequestOutput, TokenLogprob
from runtime.generate import ContextLengthError, InvalidRequestError, SamplingConfig, check_stop

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
           "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
           # extensions vLLM also takes
           "top_k", "repetition_penalty", "ignore_eos"}
COMPLETION_KEYS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_KEYS = _COMMON | {"messages", "top_logprobs", "max_completion_tokens", "response_format", "tools", "tool_choice",
                       "parallel_tool_calls", "metadata", "store", "service_tier", "add_generation_prompt"}


class APIError(Exception):
    """An error the API answers with: status, OpenAI's error body, extra headers."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(e: InvalidRequestError) -> APIError:
    """A validation error of the shared checks as the API's 400."""
    if isinstance(e, ContextLengthError):
        msg = (f"This model's maximum context length is {e.limit} tokens. However, you requested "
               f"{e.prompt_tokens + e.max_new_tokens} tokens ({e.prompt_tokens} in the prompt, {e.max_new_tokens} for the "
               f"completion). Please reduce the prompt or the completion length. ({e})")
        return APIError(400, msg, param=e.param, code="context_length_exceeded")
    return APIError(400, str(e), param=e.param, code=e.code or "invalid_value")


@dataclass
class ParsedRequest:
    """A body checked and turned into engine requests (one per prompt)."""

    requests: list[EngineRequest]
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # completions: alternatives per token; chat: top_logprobs when logprobs is on
    prompts: list[list[int]] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))


def _get(body: dict, key: str, types: tuple[type, ...], default=None, *, what: str):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        raise APIError(400, f"'{key}' must be {what}, got {v!r}", param=key, code="invalid_type")
    return v


def _check_body(body: Any, allowed: set[str], model_name: str) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0], code="unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "you must provide a model parameter (see GET /v1/models)", param="model", code="missing_parameter")
    if model != model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{model_name}'", param="model",
                       code="model_not_found")
    n = _get(body, "n", (int,), 1, what="an integer")
    if n != 1:
        raise APIError(400, f"n={n} is not supported: sli returns one choice per prompt (send the request n times)", param="n")
    for key in ("frequency_penalty", "presence_penalty"):
        if _get(body, key, (int, float), 0, what="a number") != 0:
            raise APIError(400, f"'{key}' is not supported by sli (use repetition_penalty)", param=key, code="unsupported_parameter")
    if body.get("logit_bias"):
        raise APIError(400, "'logit_bias' is not supported by sli", param="logit_bias", code="unsupported_parameter")
    return body


def _sampling(body: dict, max_tokens: int, stop_ids: tuple[int, ...]) -> SamplingConfig:
    """The shared checks (a non-number temperature or top_p is said by them, naming the parameter)."""
    try:
        return SamplingConfig.create(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.get("temperature") is None else body["temperature"],
            top_p=1.0 if body.get("top_p") is None else body["top_p"],
            top_k=0 if body.get("top_k") is None else body["top_k"],
            repetition_penalty=1.0 if body.get("repetition_penalty") is None else body["repetition_penalty"],
            seed=body.get("seed"),
            stop_token_ids=() if _get(body, "ignore_eos", (bool,), False, what="a boolean") else stop_ids,
        )
    except InvalidRequestError as e:
        raise invalid(e) from e


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", (bool,), False, what="a boolean")
    opts = _get(body, "stream_options", (dict,), {}, what="an object")
    if opts and not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return stream, bool(opts.get("include_usage", False))


def _max_tokens(body: dict, key: str, default: int | None) -> int | None:
    v = _get(body, key, (int,), None, what="an integer")
    return default if v is None else v


def parse_completion(body: Any, tokenizer, *, model_name: str, context_tokens: int, stop_ids: tuple[int, ...]) -> ParsedRequest:
    """``POST /v1/completions``: prompt (text, token ids, or a list of either), echo and logprobs.

    Raises:
        APIError: 400 (bad body or parameter), 404 (another model).
    """
    body = _check_body(body, COMPLETION_KEYS, model_name)
    if _get(body, "best_of", (int,), 1, what="an integer") != 1:
        raise APIError(400, "best_of other than 1 is not supported", param="best_of")
    if body.get("suffix"):
        raise APIError(400, "'suffix' is not supported", param="suffix", code="unsupported_parameter")
    prompts = _prompts(body.get("prompt"), tokenizer)
    echo = _get(body, "echo", (bool,), False, what="a boolean")
    logprobs = _get(body, "logprobs", (int,), None, what="an integer")
    stream, usage = _stream_flags(body)
    max_tokens = _max_tokens(body, "max_tokens", DEFAULT_COMPLETION_TOKENS)
    sampling = _sampling(body, max_tokens, stop_ids)
    stop = _stop(body)
    reqs = [EngineRequest(tuple(p), sampling, stop, logprobs=logprobs, prompt_logprobs=logprobs if echo else None,
                          request_id=f"cmpl-{uuid.uuid4().hex}") for p in prompts]
    return ParsedRequest(reqs, stream=stream, include_usage=usage, echo=echo, logprobs=logprobs, prompts=prompts)


def parse_chat(body: Any, tokenizer, *, model_name: str, context_tokens: int, stop_ids: tuple[int, ...]) -> ParsedRequest:
    """``POST /v1/chat/completions``: the messages through the tokenizer's chat template.

    Raises:
        APIError: 400 (bad body, messages or parameter, or a history longer than the context), 404.
    """
    body = _check_body(body, CHAT_KEYS, model_name)
    if body.get("tools"):
        raise APIError(400, "tools are not supported by sli", param="tools", code="unsupported_parameter")
    fmt = _get(body, "response_format", (dict,), {"type": "text"}, what="an object")
    if fmt.get("type", "text") != "text":
        raise APIError(400, f"response_format {fmt.get('type')!r} is not supported (only text)", param="response_format")
    want_lp = _get(body, "logprobs", (bool,), False, what="a boolean")
    top = _get(body, "top_logprobs", (int,), None, what="an integer")
    if top is not None and not want_lp:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    ids = chat_ids(body.get("messages"), tokenizer, add_generation_prompt=_get(body, "add_generation_prompt", (bool,), True,
                                                                             what="a boolean"))
    stream, usage = _stream_flags(body)
    max_tokens = _max_tokens(body, "max_completion_tokens", None)
    max_tokens = _max_tokens(body, "max_tokens", max_tokens)
    if max_tokens is None:  # OpenAI: up to the context
        max_tokens = max(0, context_tokens - len(ids)) if len(ids) < context_tokens else 1
    sampling = _sampling(body, max_tokens, stop_ids)
    lp = (top or 0) if want_lp else None
    req = EngineRequest(tuple(ids), sampling, _stop(body), logprobs=lp, request_id=f"chatcmpl-{uuid.uuid4().hex}")
    return ParsedRequest([req], stream=stream, include_usage=usage, logprobs=lp, prompts=[ids])


def _stop(body: dict) -> tuple[str, ...]:
    try:
        return check_stop(body.get("stop"))
    except InvalidRequestError as e:
        raise invalid(e) from e


def _prompts(prompt: Any, tokenizer) -> list[list[int]]:
    """Text, token ids, or a list of either, as token id lists."""
    def is_ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        items: list = [prompt]
    elif is_ids(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        items = prompt
    else:
        raise APIError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either", param="prompt",
                       code="invalid_type")
    out = [list(p) if isinstance(p, list) else tokenizer(p)["input_ids"] for p in items]
    if any(not p for p in out):
        raise APIError(400, "the prompt is empty", param="prompt")
    return out


def chat_ids(messages: Any, tokenizer, *, add_generation_prompt: bool = True) -> list[int]:
    """The messages' token ids through the tokenizer's chat template.

    Raises:
        APIError: 400 for malformed messages or a tokenizer without a chat template.
    """
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages", code="invalid_type")
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}] must be an object with a role of system, developer, user, assistant or tool",
                           param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")
        msgs.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


# -- responses -----------------------------------------------------------------------------------
@dataclass
class Choice:
    """What one prompt's outputs added up to so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    def add(self, o: RequestOutput) -> None:
        self.text += o.text
        self.token_ids += o.token_ids
        self.logprobs += o.logprobs or []
        if o.prompt_logprobs is not None:
            self.prompt_logprobs = o.prompt_logprobs
        self.finish_reason, self.error = o.finish_reason, o.error
        self.prompt_tokens, self.completion_tokens = o.prompt_tokens, o.completion_tokens


def usage(choices: list[Choice]) -> dict[str, int]:
    p, c = sum(x.prompt_tokens for x in choices), sum(x.completion_tokens for x in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _piece(tokenizer, t: int) -> str:
    return tokenizer.decode([t])


def completion_logprobs(tokenizer, ids: list[int], lps: list[TokenLogprob | None], offset0: int = 0) -> dict[str, Any]:
    """OpenAI's completions logprobs: tokens, their logprobs, the top alternatives (with the token
    itself, as vLLM gives them) and text offsets; None where a position has none (the prompt's first token)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset0
    for t, lp in zip(ids, lps):
        s = _piece(tokenizer, t)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
        if lp is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(lp.logprob)
        top = {_piece(tokenizer, a): v for a, v in lp.top}
        top.setdefault(s, lp.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(t: int, v: float) -> dict[str, Any]:
        s = _piece(tokenizer, t)
        return {"token": s, "logprob": v, "bytes": list(s.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(a, v) for a, v in lp.top]} for lp in lps]}


def completion_choice(tokenizer, c: Choice, prompt: list[int], parsed: ParsedRequest) -> dict[str, Any]:
    text, lp = c.text, None
    if parsed.echo:
        text = tokenizer.decode(prompt) + text
    if parsed.logprobs is not None:
        if parsed.echo:
            lp = completion_logprobs(tokenizer, prompt + c.token_ids, (c.prompt_logprobs or [None] * len(prompt)) + c.logprobs)
        else:
            lp = completion_logprobs(tokenizer, c.token_ids, c.logprobs)
    return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}


def completion_body(tokenizer, parsed: ParsedRequest, choices: list[Choice], model_name: str) -> dict[str, Any]:
    return {"id": parsed.requests[0].request_id, "object": "text_completion", "created": parsed.created, "model": model_name,
            "choices": [completion_choice(tokenizer, c, parsed.prompts[c.index], parsed) for c in choices],
            "usage": usage(choices)}


def chat_body(tokenizer, parsed: ParsedRequest, choices: list[Choice], model_name: str) -> dict[str, Any]:
    c = choices[0]
    return {"id": parsed.requests[0].request_id, "object": "chat.completion", "created": parsed.created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                         "logprobs": chat_logprobs(tokenizer, c.logprobs) if parsed.logprobs is not None else None,
                         "finish_reason": c.finish_reason}],
            "usage": usage(choices)}


def completion_chunk(tokenizer, parsed: ParsedRequest, index: int, o: RequestOutput, model_name: str, *,
                     first: bool) -> dict[str, Any]:
    text, lp = o.text, None
    prompt = parsed.prompts[index]
    if parsed.echo and first:
        text = tokenizer.decode(prompt) + text
    if parsed.logprobs is not None:
        ids, lps = list(o.token_ids), list(o.logprobs or [])
        if parsed.echo and o.prompt_logprobs is not None:
            ids, lps = prompt + ids, list(o.prompt_logprobs) + lps
        lp = completion_logprobs(tokenizer, ids, lps)
    return {"id": parsed.requests[0].request_id, "object": "text_completion", "created": parsed.created, "model": model_name,
            "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": o.finish_reason}]}


def chat_chunk(tokenizer, parsed: ParsedRequest, o: RequestOutput | None, model_name: str) -> dict[str, Any]:
    """A chat stream chunk: ``o`` None is the opening one (the assistant's role)."""
    if o is None:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    else:
        delta = {"content": o.text} if o.text or not o.finished else {}
        lp = chat_logprobs(tokenizer, o.logprobs or []) if parsed.logprobs is not None and o.logprobs else None
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": o.finish_reason}
    return {"id": parsed.requests[0].request_id, "object": "chat.completion.chunk", "created": parsed.created,
            "model": model_name, "choices": [choice]}
