"""`sli serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

The stack is Starlette on uvicorn. Starlette rather than FastAPI: the server's whole job is to
parse a body, hand it to the one validation every sli entry point shares and stream the
engine's outputs back; FastAPI's pydantic layer would be a second validation whose errors
(422, its own body) differ from OpenAI's 400 and would have to be overridden route by route.
Starlette is the ASGI toolkit FastAPI itself is built on, with two small dependencies.

A thin layer (STYLE rule 20): handlers parse and validate (:mod:`sli.openai_api`), submit to
the :class:`~runtime.engine.Engine` and relay its outputs; no torch call happens here. Each
request's outputs come from the engine thread through ``loop.call_soon_threadsafe`` into an
``asyncio.Queue``. A client that goes away has its requests cancelled (their blocks freed at
the next step boundary). SIGTERM (or Ctrl-C) stops taking requests, lets those in flight
finish up to ``--shutdown-timeout``, cancels the rest and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from runtime.engine import Engine, EngineClosedError, QueueFullError, RequestOutput
from runtime.generate import InvalidRequestError
from runtime.memory import anon_rss_bytes
from sli.openai_api import (
    APIError,
    Choice,
    ParsedRequest,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    invalid,
    parse_chat,
    parse_completion,
    usage,
)

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# A request body larger than this is refused (413); past the limit it is read and dropped, never
# held (a client still sending would otherwise see a reset, not the answer). A prompt that fills
# a 128 K-token context is about 1 MB of text, or of token ids in JSON.
DEFAULT_MAX_BODY_BYTES = 4 << 20


@dataclass
class ServerState:
    engine: Engine
    tokenizer: Any
    model_name: str
    api_key: str | None
    stop_ids: tuple[int, ...]
    info: dict[str, Any]
    created: int
    draining: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def _error_response(e: APIError):
    from starlette.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _ApiKey:
    """Pure ASGI middleware: every HTTP request must carry ``Authorization: Bearer <key>``."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                err = APIError(401, "incorrect API key provided: send it as 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: ServerState):
    """The Starlette application over a started engine."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def health(request: Request) -> JSONResponse:
        core = state.engine.core
        alive = state.engine.alive
        body = {"status": "draining" if state.draining else ("ok" if alive else "engine stopped"),
                "running": core.num_running, "waiting": core.num_waiting,
                "kv_blocks": core.pool.num_blocks, "kv_blocks_free": len(core.pool.free), "kv_dtype": core.pool.kv_dtype.value,
                "context_tokens": core.context_tokens, "engine": core.stats.to_dict(),
                "memory": {**state.info.get("memory", {}), "anon_bytes": anon_rss_bytes()}}
        pipeline = getattr(core.model, "health", None)
        if pipeline is not None:  # a pipeline's stages: which layers live where, and whether one is gone
            body["pipeline"] = pipeline()
            if core.model.lost:
                body["status"], alive = f"pipeline {body['pipeline']['error']}", False
        return JSONResponse(body, status_code=200 if alive else 503)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "sli",
             "max_model_len": state.engine.core.context_tokens}]})

    async def body_of(request: Request) -> Any:
        limit = state.max_body_bytes
        too_large = APIError(413, f"the request body is larger than the server's limit of {limit} bytes; send a shorter "
                                  "prompt (or start the server with a larger --max-body-bytes)", code="request_too_large")
        declared = request.headers.get("content-length")
        over = declared is not None and declared.isdigit() and int(declared) > limit
        raw = bytearray()
        async for chunk in request.stream():  # a chunked body has no length: counted as it comes
            if over:
                continue  # read and dropped, never held: a client still sending gets its 413, not a reset
            raw += chunk
            if len(raw) > limit:
                over, raw = True, bytearray()
        if over:
            raise too_large
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from e

    async def completions(request: Request):
        return await _run(request, parse_completion, completion_body, stream_completion)

    async def chat(request: Request):
        return await _run(request, parse_chat, chat_body, stream_chat)

    async def _run(request: Request, parse: Callable, build: Callable, streamer: Callable):
        body = await body_of(request)
        parsed: ParsedRequest = parse(body, state.tokenizer, model_name=state.model_name,
                                      context_tokens=state.engine.core.context_tokens, stop_ids=state.stop_ids)
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in parsed.requests]
        submitted: list[str] = []
        lost = getattr(state.engine.core.model, "lost", None)
        if lost:
            raise APIError(503, f"the pipeline lost {lost}; serving resumes when torchrun re-forms the world",
                           type="server_error", code="stage_lost", headers={"Retry-After": "10"})
        try:
            for req, q in zip(parsed.requests, queues):
                if state.draining:
                    raise EngineClosedError("the server is shutting down and takes no new requests")
                state.engine.submit(req, lambda o, q=q: loop.call_soon_threadsafe(q.put_nowait, o))
                submitted.append(req.request_id)
        except InvalidRequestError as e:
            _cancel(submitted)
            raise invalid(e) from e
        except QueueFullError as e:
            _cancel(submitted)
            raise APIError(503, f"the server is busy: {e}", type="server_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from e
        except EngineClosedError as e:
            _cancel(submitted)
            raise APIError(503, str(e), type="server_error", code="shutting_down", headers={"Retry-After": "5"}) from e
        if parsed.stream:
            return StreamingResponse(streamer(parsed, queues), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await _collect(request, parsed, queues)
        failed = [c for c in choices if c.finish_reason == "error"]
        if failed:
            raise APIError(500, f"generation failed: {failed[0].error}", type="server_error", code="engine_error")
        return JSONResponse(build(state.tokenizer, parsed, choices, state.model_name))

    def _cancel(ids: list[str]) -> None:
        for rid in ids:
            state.engine.cancel(rid)

    async def _collect(request: Request, parsed: ParsedRequest, queues: list[asyncio.Queue]) -> list[Choice]:
        """Every prompt's outputs to the end; a client that goes away cancels its requests."""
        choices = [Choice(i) for i in range(len(queues))]

        async def gather() -> None:
            for c, q in zip(choices, queues):
                while True:
                    o: RequestOutput = await q.get()
                    c.add(o)
                    if o.finished:
                        break

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                _cancel([r.request_id for r in parsed.requests])
                work.cancel()
                raise APIError(499, "the client closed the request")
            return choices
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                _cancel([r.request_id for r in parsed.requests])

    async def _events(parsed: ParsedRequest, queues: list[asyncio.Queue], chunk: Callable, opening: list[dict]):
        """SSE lines: the opening chunks, each output as a chunk, the usage chunk if asked, ``[DONE]``.
        Cancelled (the client went away), it cancels the requests still running."""
        choices = [Choice(i) for i in range(len(queues))]
        live = set(range(len(queues)))
        try:
            for c in opening:
                yield _sse(c)
            merged: asyncio.Queue = asyncio.Queue()

            async def relay(i: int, q: asyncio.Queue) -> None:
                while True:
                    o = await q.get()
                    await merged.put((i, o))
                    if o.finished:
                        return

            relays = [asyncio.ensure_future(relay(i, q)) for i, q in enumerate(queues)]
            try:
                while live:
                    i, o = await merged.get()
                    first = not choices[i].token_ids and choices[i].prompt_logprobs is None
                    choices[i].add(o)
                    if o.finished:
                        live.discard(i)
                    if o.finish_reason == "error":
                        yield _sse(APIError(500, f"generation failed: {o.error}", type="server_error", code="engine_error").body())
                        continue
                    if o.text or o.token_ids or o.finished or o.prompt_logprobs is not None:
                        body = chunk(i, o, first)
                        if parsed.include_usage:
                            body["usage"] = None
                        yield _sse(body)
            finally:
                for r in relays:
                    r.cancel()
            if parsed.include_usage:
                yield _sse({"id": parsed.requests[0].request_id, "object": opening_object(chunk), "created": parsed.created,
                            "model": state.model_name, "choices": [], "usage": usage(choices)})
            yield "data: [DONE]\n\n"
        finally:
            if live:  # the client went away (or the server is stopping): free what it held
                _cancel([parsed.requests[i].request_id for i in live])

    def opening_object(chunk: Callable) -> str:
        return "chat.completion.chunk" if chunk.__name__ == "chat_part" else "text_completion"

    def stream_completion(parsed: ParsedRequest, queues: list[asyncio.Queue]) -> AsyncIterator[str]:
        def completion_part(i: int, o: RequestOutput, first: bool) -> dict:
            return completion_chunk(state.tokenizer, parsed, i, o, state.model_name, first=first)

        return _events(parsed, queues, completion_part, [])

    def stream_chat(parsed: ParsedRequest, queues: list[asyncio.Queue]) -> AsyncIterator[str]:
        def chat_part(i: int, o: RequestOutput, first: bool) -> dict:
            return chat_chunk(state.tokenizer, parsed, o, state.model_name)

        opening = chat_chunk(state.tokenizer, parsed, None, state.model_name)
        if parsed.include_usage:
            opening["usage"] = None
        return _events(parsed, queues, chat_part, [opening])

    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request %s %s failed", request.method, request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    middleware = [Middleware(_ApiKey, key=state.api_key)] if state.api_key else []
    return Starlette(
        routes=[Route("/health", health), Route("/v1/models", models),
                Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/chat/completions", chat, methods=["POST"])],
        middleware=middleware,
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error},
    )


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _uvicorn_server(app, host: str, port: int, shutdown_timeout_s: float, on_signal: Callable[[], None]):
    """A uvicorn server whose SIGTERM/SIGINT is a graceful stop with exit status 0 (uvicorn
    itself re-raises the signal after shutting down, so the process would die of it)."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            def handle(sig, frame) -> None:
                logger.info("signal %d: taking no new requests, finishing those in flight (up to %.0f s)", sig, shutdown_timeout_s)
                on_signal()
                self.handle_exit(sig, frame)

            old = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout_s,
                            lifespan="off", access_log=False)
    return _Server(config)


def import_baseline(processor) -> int:
    """Anonymous memory after importing everything serving runs (transformers imports a model's
    modules lazily, on first use), before anything is loaded: what the budget is measured over,
    as ``sli bench`` measures it."""
    import gc

    import accelerate  # noqa: F401
    import starlette.applications  # noqa: F401
    import uvicorn  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from runtime.executor import config_from_manifest
    from runtime.memory import release_free_memory

    if processor.cache_only:
        from cache.store import LayerStore

        with LayerStore(processor.cache_dir, readonly=True) as st:
            config = config_from_manifest(st.require_manifest(processor.variant_id))
    else:
        config = processor.source.config
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports the modeling module
    gc.collect()
    release_free_memory()
    return anon_rss_bytes()


def _budget_bytes(budget, model) -> int:
    from runtime.memory import parse_size

    return parse_size(budget) if isinstance(budget, (int, str)) and str(budget).strip().lower() != "auto" else model.plan.budget_bytes


def tokenizer_within_budget(processor):
    """Load the tokenizer before the model and take what it holds (a fast tokenizer's vocabulary
    and merges: about 16 MB for SmolLM2's) out of the model's budget, so the server as a whole
    keeps to ``--memory-budget``. Returns (tokenizer, bytes it took)."""
    import gc

    from cache.store import LayerStore
    from runtime.memory import format_size, parse_size, release_free_memory
    from runtime.tokenizer import load_tokenizer

    def settled() -> int:  # what is held, not what was freed and not yet given back
        gc.collect()
        release_free_memory()
        return anon_rss_bytes()

    before = settled()
    with LayerStore(processor.cache_dir, readonly=True) as st:
        tok = load_tokenizer(st, st.require_manifest(processor.variant_id))
    held = max(0, settled() - before)
    budget = processor.memory_budget
    if isinstance(budget, (int, str)) and str(budget).strip().lower() != "auto":
        rest = parse_size(budget) - held
        if rest <= 0:
            raise ValueError(f"the tokenizer alone holds {format_size(held)}, the whole budget of {format_size(parse_size(budget))}; "
                             "raise --memory-budget")
        logger.info("the tokenizer holds %s: the model plans within the remaining %s", format_size(held), format_size(rest))
        processor.memory_budget = rest
    return tok, held


def quantize_apart(processor) -> None:
    """Build the processor's variant in a child process when the cache lacks it, so the memory
    quantizing takes is never part of the server's.

    Raises:
        RuntimeError: the child failed (its error is in the log above).
    """
    import multiprocessing

    if processor.cache_only or processor._variant_complete():
        return
    logger.info("quantizing %s first (in a child process)", processor.model_path)
    child = multiprocessing.get_context("fork").Process(target=_quantize_child, args=(processor,), name="sli-quantize")
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"quantizing {processor.model_path} failed (exit status {child.exitcode}); see the error above")


def _quantize_child(processor) -> None:
    processor.quantize()


def serve(processor, *, host: str = LOOPBACK, port: int = 8000, api_key: str | None = None, model_name: str | None = None,
          engine_config=None, shutdown_timeout_s: float = 30.0, baseline_anon_bytes: int | None = None,
          ready: Callable[[str], None] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> int:
    """Load the model (quantizing first if needed), start the engine and serve until SIGTERM.

    Returns 0 after a graceful stop. ``ready`` is called with the URL once the socket listens.
    """
    from runtime.engine import EngineConfig, EngineCore

    base = baseline_anon_bytes if baseline_anon_bytes is not None else import_baseline(processor)
    quantize_apart(processor)
    budget = processor.memory_budget
    tok, held = tokenizer_within_budget(processor)
    model = processor.load()
    engine = Engine(EngineCore(model, tok, processor.prefix_session(), engine_config or EngineConfig()))
    name = model_name or processor.model_path.name
    eos = tok.eos_token_id
    state = ServerState(engine=engine, tokenizer=tok, model_name=name, api_key=api_key, max_body_bytes=max_body_bytes,
                        stop_ids=tuple([eos] if isinstance(eos, int) else (eos or [])), created=int(time.time()),
                        info={"memory": {"baseline_anon_bytes": base, "budget_bytes": _budget_bytes(budget, model),
                                         "tokenizer_bytes": held, "model_plan_bytes": model.plan.budget_bytes}})
    engine.start()

    def on_signal() -> None:
        state.draining = True
        engine.drain()

    server = _uvicorn_server(create_app(state), host, port, shutdown_timeout_s, on_signal)
    exit_code = _exit_when_stage_lost(processor, model, server)
    logger.info("%s", model.describe() if hasattr(model, "describe") else model.plan.describe())
    logger.info("engine: %d KV blocks of %d tokens (%s), up to %d running, %d waiting, %d tokens per request",
                engine.core.pool.num_blocks, engine.core.pool.block_size, engine.core.pool.kv_dtype.value,
                engine.core.max_running, engine.core.config.max_waiting, engine.core.context_tokens)

    async def main() -> None:
        serving = asyncio.ensure_future(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            url = f"http://{host}:{port}"
            logger.info("serving %s at %s%s", name, url, " (API key required)" if api_key else "")
            if ready is not None:
                ready(url)
        await serving

    try:
        asyncio.run(main())
    finally:
        clean = engine.shutdown(timeout_s=0.0)
        if not clean:
            logger.warning("requests still running at shutdown were cancelled")
    return exit_code[0] or (0 if server.started else 1)


def _exit_when_stage_lost(processor, model, server) -> list[int]:
    """A pipeline's server stops some seconds after a stage is lost (``/health`` says which
    meanwhile) and exits with :data:`runtime.pipeline.driver.EXIT_STAGE_LOST`, so that
    ``torchrun`` restarts the world. Returns the exit code's box (0 until then)."""
    code = [0]
    if getattr(model, "on_lost", None) is None:
        return code
    from runtime.pipeline.driver import EXIT_STAGE_LOST

    def lost(message: str) -> None:
        code[0] = EXIT_STAGE_LOST
        grace = processor.pipeline.restart_grace_s
        logger.error("pipeline: %s; the server stops in %.0f s for torchrun to re-form the world", message, grace)
        threading.Timer(grace, lambda: setattr(server, "should_exit", True)).start()

    model.on_lost.append(lost)
    return code
