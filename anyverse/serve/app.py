"""The OpenAI-compatible HTTP app: chat completions (media in and out, SSE streaming), the Images API, signed media
URLs, models and health, over one :class:`~anyverse.serve.runner.Runner`.

Every refusal is an OpenAI-shaped error with the right status; bodies are capped while they are read.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from anyverse.config import AnyverseConfig
from anyverse.devices import resolve_device, resolve_dtype
from anyverse.media import MediaError, decode_image, media_from_bytes
from anyverse.openai_parts import (
    Encoded,
    MediaSources,
    ParsedChat,
    RequestError,
    http_fetcher,
    media_delta,
    media_fields,
    parse_chat,
)
from anyverse.plugins import GeneratedMedia, GeneratorPool
from anyverse.serve.runner import Finished, Job, QueueFull, Runner
from anyverse.serve.store import MediaStore
from anyverse.session import Anyverse, clean_text, effective_options, save_generated
from anyverse.types import GenerationOptions, Media, MediaProduced, MediaRequest, Modality, TextDelta, TurnFinished
from anyverse.weights import MissingWeightsError

log = logging.getLogger(__name__)

_TICK_S = 0.5  # how often a waiting request checks that its client is still there
_KEEPALIVE_S = 10.0  # SSE comment after this long without output
_MAX_SEED = 2**62  # seeds of later requests and retries are this plus small offsets; all fit int64 and numpy
_REMOTE_TIMEOUT_S = 30.0  # --allow-remote-media: a URL must arrive whole within this
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "server_error"}
_INLINE = frozenset({Modality.IMAGE, Modality.AUDIO})  # chat returns these as data; video as signed URLs


@dataclass(frozen=True)
class ServeSettings:
    """What ``anyverse serve`` was started with (the model comes from ``config``)."""

    config: AnyverseConfig
    media_dir: Path
    make_session: Callable[[], Anyverse]
    served_model_name: str = "anyverse"
    api_key: str | None = None
    max_queue: int = 16
    max_body_mb: float = 64.0
    media_ttl: float = 3600.0
    allow_remote_media: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unsupported OpenAI fields are ignored, as vLLM does


class _StreamOptions(_Request):
    include_usage: bool = False


class ChatRequest(_Request):
    model: str
    messages: list[Any] = Field(min_length=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    modalities: list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=_MAX_SEED)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(default=None)
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")


class ImageRequest(_Request):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=4)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    seed: int | None = Field(default=None, ge=0, le=_MAX_SEED)
    steps: int | None = Field(default=None, ge=1, le=1000)


# ---------------------------------------------------------------------------------------------- errors, caps


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI sends it."""
    body = {"message": clean_text(message), "type": _ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _failure(err: BaseException) -> JSONResponse:
    """A job's or handler's exception as the response a client gets; anything unexpected is a logged 500."""
    if isinstance(err, RequestError):
        return error_response(err.status, err.message, err.param)
    if isinstance(err, ConnectionAbortedError):  # the client left; nobody reads this
        return error_response(499, "client closed the request")
    if isinstance(err, QueueFull):
        return error_response(429, str(err), code="queue_full", headers={"Retry-After": str(err.retry_after)})
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return error_response(422, f"{where}: {first['msg']}", where)
    if isinstance(err, MediaError):
        return error_response(413 if err.group.startswith("over caps.") else 400, str(err))
    if isinstance(err, MissingWeightsError):
        return error_response(503, f"the model cannot load: {err}")
    if isinstance(err, ValueError):
        return error_response(400, str(err))
    log.error("internal error", exc_info=err)
    return error_response(500, f"internal error ({type(err).__name__}); see the server log")


class BodyCap:
    """Refuse bodies over ``limit`` bytes: at once from Content-Length, else while they are read."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            await error_response(413 if length.isdigit() else 400, self._too_large() if length.isdigit()
                                 else "malformed Content-Length")(scope, receive, send)
            return
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise RequestError(413, self._too_large())
            return message

        await self.app(scope, capped, send)

    def _too_large(self) -> str:
        return f"request body over the {self.limit / 1024**2:g} MB cap (--max-body-mb)"


# -------------------------------------------------------------------------------------------------- the app


def create_app(settings: ServeSettings) -> FastAPI:
    """The app over one Runner; routes are closures over this server's store, pool and settings."""
    config = settings.config
    store = MediaStore(settings.media_dir, settings.media_ttl)
    device = resolve_device(config.runtime.device)
    pool = GeneratorPool(config.generators, device, resolve_dtype(config.runtime.dtype, device),
                         config.runtime.generator_memory_gb)
    runner = Runner(settings.make_session, pool, settings.max_queue)
    body_limit = int(settings.max_body_mb * 1024**2)
    remote_limit = min(config.caps.max_file_bytes, body_limit)  # no larger than an upload could be
    fetch = http_fetcher(remote_limit, _REMOTE_TIMEOUT_S) if settings.allow_remote_media else None
    sources = MediaSources(caps=config.caps, directory=store.directory, fetch=fetch, resolve=store.resolve)
    name = settings.served_model_name
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        runner.close()

    app = FastAPI(title="anyverse", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BodyCap, limit=body_limit)

    @app.exception_handler(ValueError)
    @app.exception_handler(QueueFull)
    async def _refused(request: Request, err: Exception) -> JSONResponse:
        return _failure(err)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise RequestError(401, "invalid or missing API key (Authorization: Bearer KEY)")

    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise RequestError(404, f"the model {clean_text(model)!r} does not exist; this server serves {name!r}",
                               "model")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        cache = runner.embedding_cache
        return {"status": "loading" if runner.model_state == "loading" else "ready", "model": runner.model_state,
                "waiting": runner.waiting, "running": runner.running, "cancelled": runner.cancelled,
                "embedding_cache": {"hits": cache.hits, "misses": cache.misses} if cache else None}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [_model_card(name)]}

    @app.get("/v1/models/{model}")
    async def model(request: Request, model: str) -> dict[str, Any]:
        check_key(request)
        check_model(model)
        return _model_card(name)

    @app.get("/v1/media/{file}")
    async def media(request: Request, file: str) -> FileResponse:
        sig = request.query_params.get("sig")
        if sig is None:
            check_key(request)
        return FileResponse(store.file(file, request.query_params.get("exp"), sig))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        check_key(request)
        chat_request = ChatRequest.model_validate(await _json_body(request))
        check_model(chat_request.model)
        parsed = await asyncio.to_thread(_parse, chat_request, sources)
        job = runner.submit(partial(_chat_work, runner, parsed, chat_request))
        reply = _ChatReply(job, request, store.encoder(str(request.base_url), _INLINE), chat_request, name)
        if chat_request.stream:
            first = await reply.first()
            if isinstance(first, Finished) and first.error is not None:
                return _failure(first.error)
            return _JobStream(reply.sse(first), job)
        return await reply.whole()

    @app.post("/v1/images/generations")
    async def images_generations(request: Request) -> Response:
        check_key(request)
        image_request = ImageRequest.model_validate(await _json_body(request))
        check_model(image_request.model)
        return await _images(image_request, None, request)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request) -> Response:
        check_key(request)
        form = await request.form()
        upload = form.get("image") or form.get("image[]")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "needs an image file (multipart field 'image')", "image")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        image_request = ImageRequest.model_validate(fields)
        check_model(image_request.model)
        source = await asyncio.to_thread(_source_pixels, await upload.read(), upload.filename or "image", config,
                                         store.directory)
        return await _images(image_request, source, request)

    async def _images(image_request: ImageRequest, source: GeneratedMedia | None, request: Request) -> Response:
        if len(image_request.prompt) > config.caps.max_text_chars:
            raise RequestError(413, f"{len(image_request.prompt)} characters exceed the {config.caps.max_text_chars} "
                                    "cap (caps.max_text_chars)", "prompt")
        job = runner.submit(partial(_image_work, pool, image_request, source, store.directory))
        while not isinstance(finished := await _next(job, request), Finished):
            pass
        if finished.error is not None:
            return _failure(finished.error)
        data = []
        for item in finished.value:
            if image_request.response_format == "url":
                data.append({"url": store.url(item, str(request.base_url))[0]})
            else:
                data.append({"b64_json": base64.b64encode(item.path.read_bytes()).decode()})
        return JSONResponse({"created": int(time.time()), "data": data})

    return app


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "anyverse"}


async def _json_body(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except ValueError as err:
        raise RequestError(400, f"malformed JSON body ({err})") from None


def _parse(chat_request: ChatRequest, sources: MediaSources) -> ParsedChat:
    """The request's messages as anyverse messages (all media validated) ending in the user's turn."""
    stops = [chat_request.stop] if isinstance(chat_request.stop, str) else chat_request.stop or []
    if len(stops) > 4:
        raise RequestError(422, "at most 4 stop sequences", "stop")
    parsed = parse_chat(chat_request.messages, sources, chat_request.modalities)
    if parsed.messages[-1].role != "user":
        raise RequestError(400, "the last message must be the user's", "messages")
    return parsed


# ------------------------------------------------------------------------------------------ work on the model


def _chat_work(runner: Runner, parsed: ParsedChat, chat_request: ChatRequest, job: Job) -> dict[str, Any]:
    """One turn over the request's history (model thread); returns its ``usage`` and ``finish_reason``."""
    session = runner.session()
    *history, last = parsed.messages
    session.history = list(history)
    prompt_tokens = len(session.context([*history, last]).ids)
    llm = session.config.llm
    saved = llm.max_new_tokens, llm.temperature, llm.top_p
    limit = chat_request.max_completion_tokens or chat_request.max_tokens
    text = ""
    try:  # per-request sampling settings; jobs run one at a time, so this is theirs alone
        llm.max_new_tokens = min(limit or saved[0], saved[0])
        llm.temperature = saved[1] if chat_request.temperature is None else chat_request.temperature
        llm.top_p = saved[2] if chat_request.top_p is None else chat_request.top_p
        for event in session.stream(last.text, last.media, require=parsed.require, seed=chat_request.seed,
                                    stop=job.stop):
            job.emit(event)
            if isinstance(event, TurnFinished):
                text = event.result.text
        completion = len(session.model.llm.tokenizer(text, add_special_tokens=False).input_ids) if text else 0
        finish = "length" if completion >= llm.max_new_tokens else "stop"
    finally:
        llm.max_new_tokens, llm.temperature, llm.top_p = saved
    return {"finish_reason": finish, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                               "total_tokens": prompt_tokens + completion}}


def _source_pixels(data: bytes, filename: str, config: AnyverseConfig, directory: Path) -> GeneratedMedia:
    """An uploaded image to edit: validated like any input, decoded to [H, W, 3] floats in [0, 1]."""
    media = media_from_bytes(data, filename, config.caps, directory, Modality.IMAGE)
    pixels = np.asarray(decode_image(media, config.caps), dtype=np.float32) / 255.0
    return GeneratedMedia(modality=Modality.IMAGE, data=pixels)


def _image_work(pool: GeneratorPool, image_request: ImageRequest, source: GeneratedMedia | None, directory: Path,
                job: Job) -> list[Media]:
    """Images API: the image generator alone (no LLM); ``source`` makes it an edit."""
    generator = pool.get(Modality.IMAGE)
    width = height = None
    if image_request.size not in (None, "auto"):
        w, sep, h = str(image_request.size).partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise RequestError(422, f"size {clean_text(str(image_request.size))!r}: use WIDTHxHEIGHT", "size")
        width, height = int(w), int(h)
    options = GenerationOptions(steps=image_request.steps, width=width, height=height)
    seed = image_request.seed if image_request.seed is not None else secrets.randbelow(2**31)
    made = []
    for index in range(image_request.n):
        if job.stop.is_set():
            break
        request = MediaRequest(modality=Modality.IMAGE, prompt=clean_text(image_request.prompt),
                               options=effective_options(options, None, seed, index))
        made.append(save_generated(generator.generate(request, source), directory))
    return made


# ------------------------------------------------------------------------------------------ answering a job


class _StopText:
    """Cuts the reply at the first stop sequence, holding back text that may be the start of one."""

    def __init__(self, stop: str | list[str] | None):
        self.stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.pending, self.hit = "", False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.hit = self.pending[: min(found)], "", True
            return out
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


async def _next(job: Job, request: Request) -> Any:
    """The job's next item; None on a tick with nothing new. Cancels the job if the client has left."""
    try:
        return await asyncio.wait_for(job.items.get(), _TICK_S)
    except TimeoutError:
        if await request.is_disconnected():
            job.cancel()
        return None


class _ChatReply:
    """Turns a chat job's items into an OpenAI chat completion, whole or as SSE chunks."""

    def __init__(self, job: Job, request: Request, encode: Callable[[Media], Encoded], chat_request: ChatRequest,
                 model: str):
        self.job, self.request, self.encode, self.chat_request = job, request, encode, chat_request
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created, self.model = int(time.time()), model
        self.stop_text = _StopText(chat_request.stop)

    async def first(self) -> Any:
        while (item := await _next(self.job, self.request)) is None:
            pass
        return item

    def _text(self, event: TextDelta) -> str:
        text = self.stop_text.feed(event.text)
        if self.stop_text.hit:
            self.job.stop.set()  # decoding ends at the next token; no media is made after a stop sequence
        return text

    async def whole(self) -> Response:
        text, made = [], []
        while not isinstance(item := await _next(self.job, self.request), Finished):
            if isinstance(item, TextDelta):
                text.append(self._text(item))
            elif isinstance(item, MediaProduced):
                made.append((item.media, item.request.prompt or ""))
        if item.error is not None:
            return _failure(item.error)
        content = "".join([*text, self.stop_text.flush()]).strip()
        message = {"role": "assistant", "content": content, **media_fields(made, self.encode)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": item.value["finish_reason"]}
        return JSONResponse({**self._envelope("chat.completion"), "choices": [choice], "usage": item.value["usage"]})

    async def sse(self, first: Any) -> AsyncIterator[str]:
        yield self._chunk({"role": "assistant", "content": ""})
        item, quiet_since = first, time.monotonic()
        while not isinstance(item, Finished):
            if isinstance(item, TextDelta) and (text := self._text(item)):
                yield self._chunk({"content": text})
            elif isinstance(item, MediaProduced):
                yield self._chunk(media_delta(item.media, item.request.prompt or "", self.encode))
            elif item is None and time.monotonic() - quiet_since > _KEEPALIVE_S:
                yield ": keep-alive\n\n"
            else:
                item = await _next(self.job, self.request)
                continue
            quiet_since = time.monotonic()
            item = await _next(self.job, self.request)
        if item.error is not None:
            yield f"data: {bytes(_failure(item.error).body).decode()}\n\n"
            yield "data: [DONE]\n\n"
            return
        if tail := self.stop_text.flush():
            yield self._chunk({"content": tail})
        yield self._chunk({}, item.value["finish_reason"])
        options = self.chat_request.stream_options
        if options is not None and options.include_usage:
            usage = {**self._envelope("chat.completion.chunk"), "choices": [], "usage": item.value["usage"]}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return f"data: {json.dumps({**self._envelope('chat.completion.chunk'), 'choices': [choice]})}\n\n"


class _JobStream(StreamingResponse):
    """An SSE response that stops its job however the stream ends (a client that disconnects mid-stream)."""

    def __init__(self, content: AsyncIterator[str], job: Job):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
