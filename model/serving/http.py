"""HTTP plumbing of the OpenAI-compatible server: limits, request bodies, errors, stop-string streaming.

Request bodies are pydantic models with strict types (``"5"`` or ``true`` for an integer: 422).
Every refusal is an ``APIError`` that becomes OpenAI's error shape; ``BodyLimit`` refuses bodies over
the limit with 413 before they are read whole; ``check_text`` refuses text that is not valid Unicode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException


@dataclass
class ServerLimits:
    """Boundary limits; requests beyond them get a 400 that names the limit."""

    max_tokens: int = 512  # per request
    max_prompt_chars: int = 20_000
    max_stop: int = 4  # stop strings per request
    max_messages: int = 64
    max_prompt_tokens: int | None = None  # default: the model's context minus max_tokens
    max_body_bytes: int = 1_000_000  # a request body beyond this gets 413 before it is read whole
    retry_after_s: int = 1  # the Retry-After header of a 429


class APIError(Exception):
    """An error the client caused (or a refusal); becomes an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# --- request bodies (pydantic, strict types: "5" or true for an integer -> 422) -------------------------
Number = Annotated[float, Field(strict=True)]  # an int or a float, never a string or a bool


class CommonBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are ignored, not refused

    model: str
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    n: StrictInt = 1
    stream: StrictBool = False
    stop: str | list[str] | None = None
    seed: StrictInt | None = None  # none: a fresh random seed, reported in the reply
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logprobs: Any = None
    # extensions
    repetition_penalty: Number = 1.0
    policy: str | None = None
    threshold: Number | None = None
    depth: StrictInt | None = None
    kv_mode: str | None = None


class CompletionBody(CommonBody):
    prompt: str | list[str]
    echo: StrictBool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(CommonBody):
    messages: list[ChatMessage]


class StopTrimmer:
    """Holds back the last ``len(longest stop) - 1`` characters while streaming, so a stop string is
    never sent (OpenAI semantics: the stop sequence is not part of the output)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def feed(self, piece: str) -> str:
        self.text += piece
        cut = self._cut()
        safe = len(self.text) - self.hold if cut is None else cut
        out = self.text[self.sent:max(self.sent, safe)]
        self.sent += len(out)
        return out

    def finish(self) -> str:
        cut = self._cut()
        end = len(self.text) if cut is None else cut
        out = self.text[self.sent:max(self.sent, end)]
        self.sent += len(out)
        return out

    def _cut(self) -> int | None:
        found = [self.text.find(s) for s in self.stops if s in self.text]
        return min(found) if found else None


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, by its Content-Length before it is
    read, or as soon as the bytes received pass the limit (chunked uploads)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            response = error_response(413, f"the request body is over {self.max_bytes} bytes", code="body_too_large")
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise StarletteHTTPException(413, f"the request body is over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   retry_after_s: int | None = None) -> JSONResponse:
    """An error in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``)."""
    kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
            413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}.get(status,
                                                                                                    "server_error")
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def check_text(text: str, param: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800" from a JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} is not valid Unicode: {exc.reason} at character {exc.start}", param,
                       "invalid_unicode") from exc
