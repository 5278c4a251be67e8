"""The HTTP recommendation service: a FastAPI app around one :class:`Recommender`.

``GET /health``; ``POST /recommend`` with a known ``user_id`` or a raw ``history``; OpenAPI at
``/openapi.json`` and ``/docs``. Requests are validated by pydantic models (422 on malformed
bodies, out-of-range ``k``, unknown items/behaviors; 404 on unknown users) before they reach the
model. Valid requests are micro-batched: a single worker gathers queued requests for up to
``max_wait_ms`` (or ``max_batch`` requests) and scores them in one forward pass on one inference
thread, so concurrent clients share forward passes instead of contending for the CPU.

A hostile or broken client costs little: a body over ``max_body_bytes`` is answered 413 without being
read (at once when its Content-Length says so, else as soon as the bytes received pass the limit); a
history longer than :data:`MAX_HISTORY` is refused by its length before any event is validated; and no
error answer echoes more than :data:`ECHO_CHARS` characters of what the client sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Union

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers

from m3bsr.data.batches import History
from m3bsr.errors import InputError, clip
from m3bsr.serving.recommend import Event, Recommendation, Recommender

MAX_K = 1000
MAX_HISTORY = 10_000
MAX_BODY_BYTES = 2 * 1024 * 1024
"""Default cap on a request body: 10,000 history events with ids of ~100 characters fit."""
ECHO_CHARS = 80
"""Most characters of a client's input that an error answer repeats (then ``... (N characters)``)."""
MAX_ERRORS = 10
"""Most validation errors listed in one 422 answer (then a count of the rest)."""

Id = Annotated[Union[StrictStr, StrictInt], Field(description="an original (un-remapped) id")]


class BatchingConfig(BaseModel):
    """Micro-batching knobs of the service."""

    model_config = ConfigDict(extra="forbid")

    max_batch: int = Field(64, ge=1, description="most requests scored in one forward pass")
    max_wait_ms: float = Field(2.0, ge=0.0, le=1000.0,
                               description="how long the worker waits for more requests after the first one")


# --------------------------------------------------------------------------- request/response models


class HistoryEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item: Id
    behavior: str = Field(description="a behavior name of the dataset's manifest, e.g. click or favor")
    timestamp: Union[StrictInt, float] = Field(description="event time; events are ordered by it")


class RecommendRequest(BaseModel):
    """Exactly one of ``user_id`` (a user of the training data) or ``history`` (raw events)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"user_id": "u1", "k": 10, "exclude_seen": True},
        {"history": [{"item": "i3", "behavior": "click", "timestamp": 1700000000},
                     {"item": "i7", "behavior": "favor", "timestamp": 1700000100}], "k": 5},
    ]})

    user_id: Id | None = None
    history: list[HistoryEvent] | None = Field(None, min_length=1, max_length=MAX_HISTORY)
    k: int = Field(10, ge=1, le=MAX_K, description="number of items to return")
    exclude_seen: bool = Field(False, description="mask every item of the user's history")

    @field_validator("history", mode="before")
    @classmethod
    def _few_enough_events(cls, value):
        """Count before validating: a 200,000-event history is refused without building 200,000 events."""
        if isinstance(value, list) and len(value) > MAX_HISTORY:
            raise PydanticCustomError("too_long", "history has {actual_length} events, more than {max_length}: "
                                      "send at most the {max_length} most recent ones",
                                      {"actual_length": len(value), "max_length": MAX_HISTORY})
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "RecommendRequest":
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


class ScoredItem(BaseModel):
    item: str
    score: float


class RecommendResponse(BaseModel):
    user_id: str | None
    k: int
    items: list[ScoredItem]


class Health(BaseModel):
    status: str
    model: str
    n_users: int
    n_items: int
    max_len: int
    behaviors: list[str]
    batching: BatchingConfig
    max_body_bytes: int = Field(description="request bodies above this size are answered 413")
    served_requests: int = Field(description="requests answered by the model so far")
    forward_passes: int = Field(description="micro-batches (forward passes) run so far")


# --------------------------------------------------------------------------- hostile input


def _head(value, depth: int = 0):
    """A bounded stand-in of a JSON ``value``: at most 8 items per list/dict, 3 levels, strings cut after
    :data:`ECHO_CHARS` + 1 characters; its size does not grow with the input's."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value[:ECHO_CHARS + 1]
    if depth >= 3:
        return "..."
    if isinstance(value, list):
        return [_head(v, depth + 1) for v in value[:8]]
    if isinstance(value, dict):
        return {str(k)[:ECHO_CHARS + 1]: _head(v, depth + 1) for k, v in itertools.islice(value.items(), 8)}
    return str(value)[:ECHO_CHARS + 1]


def preview(value):
    """What an error answer may repeat of a client's ``value``: a small JSON value as it is; anything
    longer than :data:`ECHO_CHARS` characters of JSON as a string of its first characters and ``...``
    (``... (N characters)`` for a string, ``... (N items)`` for a long list). The work does not grow with
    the input."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return clip(value, ECHO_CHARS)
    head = _head(value)
    text = json.dumps(head, default=str, ensure_ascii=False)
    if head == value and len(text) <= ECHO_CHARS:
        return value
    more = f" ({len(value)} items)" if isinstance(value, (list, dict)) and len(value) > 8 else ""
    return f"{text[:ECHO_CHARS]}...{more}"


def short_errors(errors: list[dict]) -> list[dict]:
    """pydantic's errors with every client-controlled part (input, loc keys, ctx values) clipped and at
    most :data:`MAX_ERRORS` of them: a 10 MB body no longer comes back in its 422 answer."""
    out = []
    for e in errors[:MAX_ERRORS]:
        loc = [x if isinstance(x, int) else clip(str(x), ECHO_CHARS) for x in e.get("loc", ())]
        item = {"type": e.get("type"), "loc": loc,
                "msg": clip(str(e.get("msg", "")), 4 * ECHO_CHARS), "input": preview(e.get("input"))}
        if e.get("ctx"):
            item["ctx"] = {str(k): preview(v if v is None or isinstance(v, (bool, int, float, str)) else str(v))
                           for k, v in e["ctx"].items()}
        out.append(item)
    if len(errors) > MAX_ERRORS:
        out.append({"type": "more_errors", "loc": ["body"], "input": None,
                    "msg": f"{len(errors) - MAX_ERRORS} more errors not listed; fix the ones above first"})
    return out


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 without reading it: at once when
    its Content-Length says so, else (chunked) as soon as the bytes received pass the limit. A body within
    the limit is read here and handed on unchanged."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, f"of {int(declared)} bytes ")
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client left
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, "")
                return
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, size: str) -> None:
        detail = (f"request body {size}is over the service's limit of {self.max_bytes} bytes. Send at most "
                  f"{MAX_HISTORY} history events (the most recent ones), or start the service with a larger "
                  "--max-body-kb")
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


# --------------------------------------------------------------------------- micro-batching


@dataclass
class _Pending:
    history: History
    k: int
    exclude_seen: bool
    user: int
    future: asyncio.Future


class MicroBatcher:
    """Gathers concurrent queries into one :meth:`Recommender.top_k` call on one inference thread."""

    def __init__(self, recommender: Recommender, cfg: BatchingConfig):
        self.recommender = recommender
        self.cfg = cfg
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0
        self.requests = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3bsr-infer")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            p = self._queue.get_nowait()
            if not p.future.done():
                p.future.set_exception(RuntimeError("service shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._queue = self._executor = None

    async def submit(self, history: History, k: int, exclude_seen: bool, user: int = 0) -> list[Recommendation]:
        if self._queue is None:
            raise RuntimeError("MicroBatcher not started (use the app inside its lifespan)")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(history, k, exclude_seen, user, future))
        return await future

    def _drain(self, batch: list[_Pending]) -> None:
        while len(batch) < self.cfg.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            self._drain(batch)
            if len(batch) < self.cfg.max_batch and self.cfg.max_wait_ms > 0:
                await asyncio.sleep(self.cfg.max_wait_ms / 1000)
                self._drain(batch)
            batch = [p for p in batch if not p.future.done()]  # drop requests whose client left
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(
                    self._executor, self.recommender.top_k, [p.history for p in batch], [p.k for p in batch],
                    [p.exclude_seen for p in batch], [p.user for p in batch])
            except Exception as e:  # noqa: BLE001 - hand the failure to every waiting request
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            self.batches += 1
            self.requests += len(batch)
            for p, r in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(r)


# --------------------------------------------------------------------------- the app


def create_app(source: str | Path | Recommender, batching: BatchingConfig | None = None, *,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving ``source`` (a run directory, loaded once here, or a Recommender); request
    bodies over ``max_body_bytes`` are answered 413."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
    recommender = source if isinstance(source, Recommender) else Recommender.from_run(source)
    batching = batching or BatchingConfig()
    batcher = MicroBatcher(recommender, batching)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="m3bsr recommendation service", version="1",
                  description="Top-k items (original ids) from a trained m3bsr run.", lifespan=lifespan)
    app.state.recommender = recommender
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": short_errors(list(exc.errors()))}, status_code=422)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", model=recommender.cfg.model.name, n_users=recommender.n_users,
                      n_items=recommender.n_items, max_len=recommender.max_len,
                      behaviors=list(recommender.behaviors), batching=batching, max_body_bytes=max_body_bytes,
                      served_requests=batcher.requests, forward_passes=batcher.batches)

    @app.post("/recommend", response_model=RecommendResponse,
              responses={404: {"description": "unknown user_id"},
                         413: {"description": "request body over the service's size limit"},
                         422: {"description": "malformed body, k out of range, history too long, unknown item "
                                              "or behavior"}})
    async def recommend(req: RecommendRequest) -> RecommendResponse:
        if req.k > recommender.n_items:
            raise HTTPException(422, f"k={req.k}: more than the {recommender.n_items} items of the catalogue. "
                                     f"Ask for at most {recommender.n_items}")
        user = 0
        try:
            if req.user_id is not None:
                if not recommender.has_user(req.user_id):
                    raise HTTPException(404, f"user_id {clip(str(req.user_id), ECHO_CHARS)!r}: unknown user (not in "
                                             "the run's prepared dataset). Use an original user id from the "
                                             "training data, or send a raw history")
                history = recommender.user_history(req.user_id, where="user_id")
                user = recommender.dense_user(req.user_id)
            else:
                events = [Event(str(e.item), e.behavior, e.timestamp) for e in req.history]
                history = recommender.parse_history(events)
        except InputError as e:
            raise HTTPException(422, str(e)) from None
        items = await batcher.submit(history, req.k, req.exclude_seen, user)
        return RecommendResponse(user_id=None if req.user_id is None else str(req.user_id), k=req.k,
                                 items=[ScoredItem(item=r.item, score=r.score) for r in items])

    return app
