"""The HTTP recommendation service: a FastAPI app around one :class:`Recommender`.

``GET /health``; ``POST /recommend`` with a known ``user_id`` or a raw ``history``; OpenAPI at
``/openapi.json`` and ``/docs``. Requests are validated by pydantic models (422 on malformed
bodies, out-of-range ``k``, unknown items/behaviors; 404 on unknown users) before they reach the
model. Valid requests are micro-batched: a single worker gathers queued requests for up to
``max_wait_ms`` (or ``max_batch`` requests) and scores them in one forward pass on one inference
thread, so concurrent clients share forward passes instead of contending for the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Union

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from m3bsr.data.batches import History
from m3bsr.errors import InputError
from m3bsr.serving.recommend import Event, Recommendation, Recommender

MAX_K = 1000
MAX_HISTORY = 10_000

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
    served_requests: int = Field(description="requests answered by the model so far")
    forward_passes: int = Field(description="micro-batches (forward passes) run so far")


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


def create_app(source: str | Path | Recommender, batching: BatchingConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``source`` (a run directory, loaded once here, or a Recommender)."""
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

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", model=recommender.cfg.model.name, n_users=recommender.n_users,
                      n_items=recommender.n_items, max_len=recommender.max_len,
                      behaviors=list(recommender.behaviors), batching=batching,
                      served_requests=batcher.requests, forward_passes=batcher.batches)

    @app.post("/recommend", response_model=RecommendResponse,
              responses={404: {"description": "unknown user_id"},
                         422: {"description": "malformed body, k out of range, unknown item or behavior"}})
    async def recommend(req: RecommendRequest) -> RecommendResponse:
        if req.k > recommender.n_items:
            raise HTTPException(422, f"k={req.k}: more than the {recommender.n_items} items of the catalogue. "
                                     f"Ask for at most {recommender.n_items}")
        user = 0
        try:
            if req.user_id is not None:
                if not recommender.has_user(req.user_id):
                    raise HTTPException(404, f"user_id {str(req.user_id)!r}: unknown user (not in the run's "
                                             "prepared dataset). Use an original user id from the training "
                                             "data, or send a raw history")
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
