"""The HTTP API (FastAPI on uvicorn): ``/recommend``, ``/similar``, ``/healthz``, ``/readyz``; OpenAPI at ``/docs``.

Every answer names the model version, the publish version and the watermark it was computed from, and its
server-side timings. Bad input never reaches the model: query parameters and bodies are validated by pydantic
(unknown fields and unknown or repeated query parameters refused, ids at most the event contract's length,
numbers finite), ``k`` is bounded by ``max_k``, bodies by ``max_body_bytes`` (413), and the work of a request
by ``request_timeout_s`` (503). Every refusal is a JSON ``{"error": message}`` with a 4xx status.

The model and index work is synchronous (torch, faiss); it runs in the thread pool so the event loop keeps
accepting requests, and both release the GIL for their heavy parts.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.metrics import ServingMetrics
from serving.recommend import Answer, UnknownItem, recommend, similar
from serving.settings import ServingSettings
from serving.snapshot import ServedVersions
from serving.worker_records import WorkerRecords
from streaming.events import Limits, UserProfile

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_ID_CHARS = Limits.max_id_chars  # the event contract's bound on ids (streaming/events.py)
Id = Annotated[str, Field(min_length=1, max_length=_ID_CHARS)]
Short = Annotated[str, Field(max_length=_ID_CHARS)]
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class Profile(BaseModel):
    """Profile fields of a user the store does not know (the shape of a ``user`` event's features)."""

    model_config = _STRICT
    discrete: dict[Short, Short] = Field(default_factory=dict, max_length=64)
    multi: dict[Short, Annotated[list[Short], Field(max_length=256)]] = Field(default_factory=dict, max_length=64)
    numeric: dict[Short, float] = Field(default_factory=dict, max_length=64)


class RecommendRequest(BaseModel):
    """``POST /recommend``: a user (or none: an anonymous session), and context the store may not have."""

    model_config = _STRICT
    user_id: Id | None = None
    k: int | None = Field(default=None, ge=1)
    recent_items: list[Id] = Field(default_factory=list, description="clicked item ids, oldest first")
    profile: Profile | None = None


class Hit(BaseModel):
    item_id: str
    score: float


class Recommendations(BaseModel):
    """Items best first, and the one version they were computed from."""

    items: list[Hit]
    user_id: str | None = None
    item_id: str | None = None
    cold_start: bool = False
    model_version: str
    publish_version: int
    watermark_ms: int
    timings_ms: dict[str, float]


class Problem(BaseModel):
    error: str


_ENDPOINTS = {"/recommend", "/similar"}
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Problem} for code in (400, 401, 404, 413, 503)}


def _answer(answer: Answer, **who: str | None) -> Response:
    """The answer as JSON, serialised once by pydantic-core (a returned model would be validated and encoded
    again by FastAPI: about a millisecond for 100 items). ``response_model`` still documents the shape."""
    return Response(_recommendations(answer, **who).model_dump_json(), media_type="application/json")


def _recommendations(answer: Answer, **who: str | None) -> Recommendations:
    return Recommendations(
        items=[Hit(item_id=i, score=s) for i, s in answer.items],
        cold_start=answer.cold,
        model_version=answer.model_version,
        publish_version=answer.publish_version,
        watermark_ms=answer.watermark_ms,
        timings_ms={k: round(v, 3) for k, v in answer.timings_ms.items()},
        **who,
    )


def _message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class _Guard:
    """Pure ASGI middleware: body size bound (413) and the metrics of every API request."""

    def __init__(self, app: ASGIApp, settings: ServingSettings, metrics: ServingMetrics) -> None:
        self.app = app
        self.max_body = settings.max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else None
        start = time.perf_counter()
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                await _refuse(413, f"request body over {self.max_body} bytes", sending)
                return
            seen = [0]

            async def receiving() -> Message:
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > self.max_body:
                        raise _TooLarge
                return message

            try:
                await self.app(scope, receiving, sending)
            except _TooLarge:
                await _refuse(413, f"request body over {self.max_body} bytes", sending)
        finally:
            if endpoint is not None:
                code = status[0]
                cold = scope.get("state", {}).get("cold", False)
                outcome = "error" if code >= 500 else "bad_request" if code >= 400 else "cold_user" if cold else "ok"
                name = endpoint.strip("/")
                self.metrics.requests.labels(name, outcome, str(code)).inc()
                self.metrics.request_seconds.labels(name).observe(time.perf_counter() - start)


class _TooLarge(Exception):
    pass


async def _refuse(status: int, message: str, send: Callable[[Message], Awaitable[None]]) -> None:
    body = JSONResponse({"error": message}, status_code=status).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(
    settings: ServingSettings,
    served: ServedVersions,
    metrics: ServingMetrics,
    records: WorkerRecords | None = None,
) -> FastAPI:
    """The ASGI application over ``served`` (whose refresher the caller runs)."""
    app = FastAPI(
        title="freshtower serving",
        summary="Online two-tower retrieval over freshly published embeddings",
        version="1",
        responses=_ERRORS,
        redirect_slashes=False,  # a wrong path is a 404, not a redirect to guess at
    )

    def authorised(request: Request) -> None:
        if not settings.token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def only(request: Request, *allowed: str) -> None:
        keys = [k for k, _ in request.query_params.multi_items()]
        unknown = sorted(set(keys) - set(allowed))
        if unknown:
            raise HTTPException(400, f"unknown query parameter(s) {unknown}; expected {list(allowed)}")
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise HTTPException(400, f"query parameter(s) {repeated} given more than once")

    def bounded_k(k: int | None) -> int:
        k = settings.default_k if k is None else k
        if not 1 <= k <= settings.max_k:
            raise HTTPException(400, f"k must be between 1 and {settings.max_k}, got {k}")
        return k

    async def run(work: Callable[[], Answer]) -> Answer:
        if not served.ready:
            raise HTTPException(503, "no store version is loaded yet")
        try:
            return await asyncio.wait_for(run_in_threadpool(work), settings.request_timeout_s)
        except TimeoutError:
            raise HTTPException(503, f"request took longer than {settings.request_timeout_s} s") from None

    def recommend_now(user_id: str | None, k: int, recent: list[str], profile: UserProfile | None) -> Answer:
        with served.acquire() as snapshot:
            return recommend(
                snapshot,
                user_id,
                k,
                recent_items=recent,
                profile=profile,
                records=records,
                prior_gamma=settings.prior_gamma,
                prior_candidates=settings.prior_candidates,
            )

    auth = [Depends(authorised)]

    @app.get("/recommend", response_model=Recommendations, dependencies=auth)
    async def get_recommend(
        request: Request,
        user_id: Annotated[str, Query(min_length=1, max_length=_ID_CHARS)],
        k: Annotated[int | None, Query(ge=1)] = None,
    ) -> Response:
        """Top ``k`` items for a user: the user tower on the published ID row, last-N and profile."""
        only(request, "user_id", "k")
        k = bounded_k(k)
        answer = await run(lambda: recommend_now(user_id, k, [], None))
        request.state.cold = answer.cold
        return _answer(answer, user_id=user_id)

    @app.post("/recommend", response_model=Recommendations, dependencies=auth)
    async def post_recommend(request: Request, body: RecommendRequest) -> Response:
        """As ``GET``, plus context: recent items (after the published last-N) and profile fields. A user the
        store does not know, or none, is a cold start from the model's default ID row."""
        only(request)
        k = bounded_k(body.k)
        if len(body.recent_items) > settings.max_context_items:
            raise HTTPException(
                400, f"recent_items holds {len(body.recent_items)} ids, at most {settings.max_context_items}"
            )
        profile = None
        if body.profile is not None:
            p = body.profile
            profile = UserProfile(
                body.user_id or "", dict(p.discrete), {k_: tuple(v) for k_, v in p.multi.items()}, dict(p.numeric)
            )
        answer = await run(lambda: recommend_now(body.user_id, k, body.recent_items, profile))
        request.state.cold = answer.cold
        return _answer(answer, user_id=body.user_id)

    @app.get("/similar", response_model=Recommendations, dependencies=auth)
    async def get_similar(
        request: Request,
        item_id: Annotated[str, Query(min_length=1, max_length=_ID_CHARS)],
        k: Annotated[int | None, Query(ge=1)] = None,
    ) -> Response:
        """The ``k`` items nearest an item's vector."""
        only(request, "item_id", "k")
        k = bounded_k(k)

        def work() -> Answer:
            with served.acquire() as snapshot:
                return similar(snapshot, item_id, k)

        try:
            answer = await run(work)
        except UnknownItem as exc:
            raise HTTPException(404, str(exc)) from None
        return _answer(answer, item_id=item_id)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"model": Problem}})
    async def readyz() -> JSONResponse:
        """A store version and its index are loaded."""
        snapshot = served.current
        if snapshot is None:
            return JSONResponse({"error": "no store version is loaded yet"}, status_code=503)
        meta = snapshot.meta
        body = {"status": "ready", "publish_version": meta.version, "model_version": meta.model_version}
        return JSONResponse({**body, "index_items": len(snapshot.index), "index_kind": snapshot.index.kind})

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _message(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def refused(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def failed(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed", exc_info=exc)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    app.add_middleware(_Guard, settings=settings, metrics=metrics)
    return app
