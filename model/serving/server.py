"""OpenAI-compatible HTTP server with continuous depth-wise batching inside.

    python -m model.serving --model default --port 8000

Endpoints (FastAPI + uvicorn, the stack gradio already brings):

- ``POST /v1/completions``       prompt -> text (``stream: true``: server-sent events)
- ``POST /v1/chat/completions``  messages -> reply, rendered with the tokenizer's chat template
- ``GET  /v1/models``            the one model served
- ``GET  /health``               status, requests in flight, strategy

Every streamed chunk carries the token's loop depth in the extension fields ``depth`` and
``exit_reason`` of its choice; non-streamed replies carry ``depths``. Extension request fields:
``policy`` ("fixed" | "confidence" | "saturation" | "halting"), ``threshold``, ``depth`` (fixed),
``kv_mode`` ("sync" | "copy" | "recursion" | "share"), ``repetition_penalty``.

Errors are JSON in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad
input (empty or over-long prompt, parameters out of range), 404 unknown model or route, 422
malformed body, 429 queue full, 500 engine failure (message only, never a stack trace). The
engine runs in one background thread (``EngineWorker``); a client that disconnects cancels its
request.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
import uuid
import secrets
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.inference.decoder import KV_MODES, as_recursive
from model.inference.generation import MAX_SEED, Sampling
from model.inference.prompts import encode_chat
from model.errors import EngineFullError, EngineInputError
from model.inference.policies import POLICIES, make_policy
from model.serving.engine import BatchEngine
from model.serving.http import (
    APIError,
    BodyLimit,
    ChatBody,
    CommonBody,
    CompletionBody,
    ServerLimits,
    StopTrimmer,
    check_text,
    error_response,
)
from model.serving.requests import Request, RequestEvent
from model.serving.scheduler import STRATEGIES
from model.serving.worker import EngineWorker

log = logging.getLogger(__name__)

POLICY_NAMES = sorted(POLICIES)  # the one registry of policies (model.inference.policies)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


def create_app(worker: EngineWorker, tokenizer, model_name: str, limits: ServerLimits | None = None,
               default_policy: dict | None = None, aliases: tuple[str, ...] = (), api_key: str | None = None,
               watchdog_s: float | None = 1.0) -> FastAPI:
    """The FastAPI app around a started ``EngineWorker`` (tests build it in-process).

    ``api_key``: when set, every ``/v1`` route needs ``Authorization: Bearer <key>`` (else 401).
    ``watchdog_s``: how often a background task checks the engine thread and restarts it if it died
    (``None``: never; ``/health`` then answers 503 until ``worker.restart()``).
    """
    limits = limits or ServerLimits()
    default_policy = default_policy or {"policy": "fixed", "depth": worker.engine.cfg.num_loops}
    names = {model_name, *aliases}
    cfg = worker.engine.cfg

    async def watchdog():
        while True:
            await asyncio.sleep(watchdog_s)
            if not worker.healthy:
                log.error("the engine thread died; restarting it (requests in flight failed)")
                worker.restart()

    @asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(watchdog()) if watchdog_s else None
        yield
        if task is not None:
            task.cancel()

    def require_key(http: HTTPRequest) -> None:
        if api_key is None or not http.url.path.startswith("/v1"):
            return
        given = http.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    app = FastAPI(title="Adaptive-Depth Lab: OpenAI-compatible server", docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan, dependencies=[Depends(require_key)])
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    created = int(time.time())

    def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        return error_response(status, message, param, code, limits.retry_after_s if status in (429, 503) else None)

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(422, f"invalid request body: {where or 'body'}: {first.get('msg', 'malformed')}", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.exception("unhandled server error")
        return error(500, "internal error in the server; see its log")

    @app.get("/health")
    async def health():
        body = {"status": "ok" if worker.healthy else "engine thread not running", "model": model_name,
                "strategy": worker.engine.strategy, "pending": worker.pending, "max_pending": worker.max_pending,
                "loops": cfg.num_loops, "failed_requests": worker.failures}
        return JSONResponse(body, 200 if worker.healthy else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                             "owned_by": "adaptive-depth-lab", "num_loops": cfg.num_loops}]}

    def build(body: CommonBody, prompt_ids: list[int], prompt_text: str) -> Request:
        """Boundary validation: every refusal is a 400 that says what is accepted."""
        if body.model not in names:
            raise APIError(404, f"unknown model {body.model!r}; this server serves {sorted(names)}", "model",
                           "model_not_found")
        max_tokens = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None), 16)
        if not 1 <= max_tokens <= limits.max_tokens:
            raise APIError(400, f"max_tokens must be in 1..{limits.max_tokens}, got {max_tokens}", "max_tokens")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        if body.logprobs or getattr(body, "echo", False):
            raise APIError(400, "logprobs and echo are not supported", "logprobs")
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence/frequency penalties are not supported; use repetition_penalty",
                           "presence_penalty")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > limits.max_stop or any(not s for s in stops):
            raise APIError(400, f"stop: at most {limits.max_stop} non-empty strings", "stop")
        for stop in stops:
            check_text(stop, "stop")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", "prompt")
        limit = limits.max_prompt_tokens or cfg.max_position_embeddings - max_tokens
        if len(prompt_ids) > limit:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; at most {limit} fit with "
                                f"max_tokens={max_tokens}", "prompt", "context_length_exceeded")
        spec = {**default_policy}
        if body.policy is not None:
            if body.policy not in POLICY_NAMES:
                raise APIError(400, f"policy must be one of {POLICY_NAMES}", "policy")
            spec = {"policy": body.policy}
        if body.threshold is not None:
            spec["threshold"] = body.threshold
        if body.depth is not None:
            spec["depth"] = body.depth
        kv_mode = body.kv_mode or default_policy.get("kv_mode", "sync")
        if kv_mode not in KV_MODES:
            raise APIError(400, f"kv_mode must be one of {KV_MODES}", "kv_mode")
        try:
            policy = make_policy(spec["policy"], spec.get("threshold"), spec.get("depth"))
            sampling = Sampling(body.temperature, body.top_p, body.repetition_penalty,
                                body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1))
            sampling.validate()
        except (ValueError, EngineInputError) as exc:
            raise APIError(400, str(exc)) from exc
        return Request(prompt_ids=prompt_ids, max_new_tokens=max_tokens, policy=policy, kv_mode=kv_mode,
                       sampling=sampling, stop=stops, prompt=prompt_text,
                       request_id=f"{uuid.uuid4().hex[:24]}")

    def encode(text: str, param: str) -> list[int]:
        """A completion prompt is the model's raw input: special tokens written in it are parsed."""
        if not text.strip():
            raise APIError(400, f"{param} is empty", param)
        if len(text) > limits.max_prompt_chars:
            raise APIError(400, f"{param} has {len(text)} characters; at most {limits.max_prompt_chars}", param,
                           "context_length_exceeded")
        check_text(text, param)
        return tokenizer(text).input_ids

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "give one prompt (a string or a list of one string)", "prompt")
            prompt = prompt[0]
        request = build(body, encode(prompt, "prompt"), prompt)
        return await respond(request, body, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        if not body.messages or len(body.messages) > limits.max_messages:
            raise APIError(400, f"messages: give 1..{limits.max_messages} messages", "messages")
        if not any(m.content.strip() for m in body.messages):
            raise APIError(400, "messages are empty", "messages")
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions")
        total = sum(len(m.content) for m in body.messages)
        if total > limits.max_prompt_chars:
            raise APIError(400, f"messages have {total} characters; at most {limits.max_prompt_chars}", "messages",
                           "context_length_exceeded")
        for i, message in enumerate(body.messages):
            check_text(message.content, f"messages.{i}.content")
        # control tokens only from the template: a "<|im_start|>" typed in a message stays text
        ids = encode_chat(tokenizer, [m.model_dump() for m in body.messages])
        request = build(body, ids, body.messages[-1].content)
        return await respond(request, body, http, chat=True)

    async def respond(request: Request, body: CommonBody, http: HTTPRequest, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RequestEvent] = asyncio.Queue()
        request.on_event = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        if not worker.healthy:
            raise APIError(503, "the engine is restarting; retry shortly", code="engine_unavailable")
        try:
            rid = worker.submit(request)
        except EngineFullError as exc:
            raise APIError(429, str(exc), code="queue_full") from exc
        except EngineInputError as exc:
            raise APIError(400, str(exc)) from exc
        obj_id = ("chatcmpl-" if chat else "cmpl-") + rid
        seed = request.sampling.seed
        if body.stream:
            return StreamingResponse(sse(rid, obj_id, events, request, chat, http), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        trimmer = StopTrimmer(request.stop)
        depths, reasons, pieces = [], [], []
        watcher = asyncio.create_task(cancel_on_disconnect(http, rid))
        try:
            while True:
                event = await events.get()
                if event.step is not None:
                    pieces.append(trimmer.feed(event.step.text))
                    depths.append(event.step.depth)
                    reasons.append(event.step.exit_reason)
                if event.finished:
                    break
        finally:
            watcher.cancel()
            worker.cancel(rid)  # no-op once finished; cancels on server error
        if event.finish_reason == "error":
            raise APIError(500, "the engine failed on this request; see the server log")
        text = "".join(pieces) + trimmer.finish()
        finish = FINISH.get(event.finish_reason, "stop")
        choice = {"index": 0, "finish_reason": finish, "logprobs": None, "depths": depths,
                  "avg_depth": sum(depths) / len(depths) if depths else 0.0}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": obj_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "seed": seed, "choices": [choice],
                "usage": {"prompt_tokens": len(request.prompt_ids), "completion_tokens": len(depths),
                          "total_tokens": len(request.prompt_ids) + len(depths)}}

    async def cancel_on_disconnect(http: HTTPRequest, rid: str) -> None:
        """Wait for the client to go away, then cancel its request (the engine drops it at its next step)."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        log.info("client of %s disconnected: cancelling", rid)
        worker.cancel(rid)

    async def sse(rid, obj_id, events, request: Request, chat: bool, http: HTTPRequest):
        created_s = int(time.time())
        trimmer = StopTrimmer(request.stop)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, extra: dict | None = None, first: bool = False) -> str:
            choice: dict = {"index": 0, "finish_reason": finish, **(extra or {})}
            if chat:
                choice["delta"] = ({"role": "assistant", "content": text or ""} if first else
                                   ({"content": text} if text is not None else {}))
            else:
                choice["text"] = text or ""
                choice["logprobs"] = None
            return "data: " + json.dumps({"id": obj_id, "object": kind, "created": created_s, "model": model_name,
                                          "seed": request.sampling.seed, "choices": [choice]}) + "\n\n"

        watcher = asyncio.create_task(cancel_on_disconnect(http, rid))
        try:
            first = True
            while True:
                event = await events.get()
                if event.step is not None:
                    yield chunk(trimmer.feed(event.step.text), None,
                                {"depth": event.step.depth, "exit_reason": event.step.exit_reason,
                                 "token_index": event.step.index}, first=first)
                    first = False
                if event.finished:
                    break
            if event.finish_reason == "error":
                yield "data: " + json.dumps({"error": {"message": "the engine failed on this request",
                                                       "type": "server_error", "param": None, "code": None}}) + "\n\n"
            else:
                rest = trimmer.finish()
                if rest:
                    yield chunk(rest, None)
                yield chunk(None, FINISH.get(event.finish_reason, "stop"))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            worker.cancel(rid)  # client gone (generator closed) or finished: both fine

    return app


# --- loading and the command line -----------------------------------------------------------------
def load_served_model(name: str, fallback: bool = True, loops: int | None = None):
    """``(recursive model, tokenizer, served name, note)`` for ``--model``.

    "default" is the trained default; if this checkout has none and ``fallback`` is on,
    ``model.io.default.FALLBACK_CONVERSION`` of the embedded base (the dashboard's fallback too) is
    served instead and ``note`` says so. A plain Llama model is converted when ``loops`` is given.
    """
    from model.io.checkpoint import EMBEDDED_NAME, ModelLoadError, load_model
    from model.io.default import FALLBACK_CONVERSION
    from model.conversion.recursify import recursify

    note = None
    try:
        model, tokenizer = load_model(name)
    except ModelLoadError as exc:
        if name != "default" or not fallback:
            raise
        note = (f"FALLBACK: no trained default ({exc}); serving the untrained conversion of {EMBEDDED_NAME} "
                f"({FALLBACK_CONVERSION}); pass --no-fallback to fail instead")
        base, tokenizer = load_model(EMBEDDED_NAME)
        model = recursify(base, base_name=EMBEDDED_NAME, **FALLBACK_CONVERSION)
    else:
        if loops and getattr(model.config, "model_type", "") != "recursive_llama":
            model = recursify(model, num_loops=loops, lora_rank=64, base_name=name)
    return as_recursive(model).eval(), tokenizer, name, note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model
    parser.add_argument("--model", default="default", help="a load_model name: default, smollm2-135m, a folder")
    parser.add_argument("--no-fallback", action="store_true",
                        help="fail if 'default' is missing instead of serving the untrained conversion")
    parser.add_argument("--loops", type=int, default=None, help="convert a plain Llama model to this many loops")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    parser.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: half the cores; on a busy 2-core machine 2 threads "
                             "made loading and decoding several times slower than 1)")
    # engine
    parser.add_argument("--strategy", default="cdb", choices=STRATEGIES)
    parser.add_argument("--max-requests", type=int, default=16, help="requests in one batch")
    parser.add_argument("--max-batch-tokens", type=int, default=512, help="query tokens per block call")
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=64, help="queued requests beyond the batch; then 429")
    parser.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask")
    # default depth policy (requests may override with the extension fields)
    parser.add_argument("--policy", default=None, choices=POLICY_NAMES,
                        help="default: router for a MoR model, halting if the model has halting heads, else fixed "
                             "full depth")
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--kv-mode", default="sync", choices=KV_MODES)
    # http
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("LAB_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $LAB_API_KEY; none: open)")
    parser.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes,
                        help="larger request bodies get 413")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // 2))

    import uvicorn

    from model.io.checkpoint import ModelLoadError

    try:
        model, tokenizer, name, note = load_served_model(args.model, not args.no_fallback, args.loops)
    except ModelLoadError as exc:
        parser.exit(2, f"error: {exc}\n")
    if note:
        log.warning(note)
    engine = BatchEngine(model, tokenizer, strategy=args.strategy, max_requests=args.max_requests,
                         max_batch_tokens=args.max_batch_tokens, prefill_chunk=args.prefill_chunk,
                         max_queue=args.max_queue, device=args.device, dtype=args.dtype, model_name=name,
                         keep_log=False, keep_results=False)
    policy = args.policy or ("router" if getattr(model.config, "router_type", None) else
                             "halting" if model.has_halting_heads else "fixed")
    spec = {"policy": policy, "threshold": args.threshold, "depth": model.config.num_loops, "kv_mode": args.kv_mode}
    worker = EngineWorker(engine).start()
    limits = ServerLimits(max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes)
    app = create_app(worker, tokenizer, name, limits, spec, api_key=args.api_key)
    log.info("serving %s (%d loops, strategy %s, policy %s) on http://%s:%d/v1", name, model.config.num_loops,
             args.strategy, policy, args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
