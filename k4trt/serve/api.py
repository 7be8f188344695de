"""The HTTP API, in the shape of OpenAI's Videos API so its clients (the `openai` package, AIPerf) work as they are.

The app knows nothing of Ray: it reads and writes the store and tells the dispatcher a job was queued, so the
deployment hosts it on Ray Serve and the tests drive it in-process. Every error is `{"error": {"message"}}`
with one sentence, every request is checked (`parse_request`, the checks `k4trt run` makes) before anything
is queued, and bodies are capped before they are read.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from k4trt.errors import K4TRTError
from k4trt.serve import MODEL
from k4trt.serve.metrics import CONTENT_TYPE, Metrics
from k4trt.serve.request import FIELDS, parse_request
from k4trt.serve.store import Job, JobStore

MAX_BODY_BYTES = 64 * 1024  # a prompt past 224 T5 tokens is truncated anyway; nothing else in a body is large
POLL_AFTER_MS = 500  # what `create_and_poll` waits between polls (header openai-poll-after-ms)
_MEDIA_TYPES = {".mp4": "video/mp4", ".png": "image/png"}


@dataclass
class Service:
    store: JobStore
    metrics: Metrics
    on_queued: Callable[[], None]  # the dispatcher's wake-up
    released: bool  # the released checkpoint accepts only its trained sizes
    token: str | None  # when set, every route but /healthz needs `Authorization: Bearer <token>`


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": None}}, status, headers=headers)


def video_object(job: Job) -> dict[str, Any]:
    """Every field the `openai` client's `Video` model requires, plus what this server knows besides: `seed`,
    `stages` (seconds per stage), `inference_time_s` (text encoder to video encode, in the replica) and
    `peak_memory_mb` (GPU: the most PyTorch held during the job; CPU: the replica's peak resident memory)."""
    request = job.request
    return {
        "id": job.id,
        "object": "video",
        "model": MODEL,
        "status": job.status,
        "progress": job.progress,
        "created_at": job.created_at,
        "completed_at": job.completed_at,
        "expires_at": None,
        "prompt": request.prompt,
        "seconds": str(request.seconds),
        "size": request.size,
        "seed": request.seed,
        "remixed_from_video_id": None,
        "error": {"code": "generation_failed", "message": job.error} if job.status == "failed" else None,
        "stages": job.stages,
        "inference_time_s": job.inference_time_s,
        "peak_memory_mb": job.peak_memory_mb,
    }


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuses a body past `limit` bytes whether or not it declares its length, before the route reads it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await error_response(413, _too_large(self.limit))(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> str:
    return f"the request body is over {limit // 1024} KiB; send the prompt and settings only"


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="k4trt", summary="Kandinsky 4.0 T2V Flash, OpenAI Videos API shape", docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, str(error), error.headers)

    @app.exception_handler(_BodyTooLarge)
    async def _body_too_large(request: Request, error: _BodyTooLarge) -> JSONResponse:
        return error_response(413, _too_large(MAX_BODY_BYTES))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = {404: f"there is no route {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(error.status_code, str(error.detail))
        return error_response(error.status_code, message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        return error_response(400, f"{first['loc'][-1]}: {first['msg']}")

    def require_token(authorization: str | None = Header(None)) -> None:
        if service.token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.token.encode()):
            raise ApiError(401, "this server needs a token: send the header Authorization: Bearer <token>",
                           {"WWW-Authenticate": "Bearer"})

    def find(video_id: str) -> Job:
        job = service.store.get(video_id)
        if job is None:
            raise ApiError(404, f"there is no video {video_id!r}")
        return job

    router = APIRouter(dependencies=[Depends(require_token)])

    @router.post("/v1/videos")
    async def create_video(request: Request) -> JSONResponse:
        fields = await _read_fields(request)
        try:
            video = parse_request(fields, released=service.released)
        except K4TRTError as error:
            raise ApiError(400, str(error)) from None
        job = service.store.create(video)
        service.on_queued()
        return JSONResponse(video_object(job))

    @router.get("/v1/videos")
    async def list_videos(after: str | None = None, limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc") -> JSONResponse:
        try:
            jobs, more = service.store.list(after=after, limit=limit, newest_first=order == "desc")
        except K4TRTError as error:
            raise ApiError(400, str(error)) from None
        return JSONResponse({"object": "list", "data": [video_object(job) for job in jobs],
                             "first_id": jobs[0].id if jobs else None, "last_id": jobs[-1].id if jobs else None,
                             "has_more": more})

    @router.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str) -> JSONResponse:
        job = find(video_id)
        unfinished = job.status in ("queued", "in_progress")
        return JSONResponse(video_object(job), headers={"openai-poll-after-ms": str(POLL_AFTER_MS)} if unfinished
                            else None)

    @router.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, variant: str = "video") -> FileResponse:
        job = find(video_id)
        if variant != "video":
            raise ApiError(400, f"variant {variant!r} is not available; k4trt makes variant=video only")
        if job.status != "completed":
            raise ApiError(404, f"video {job.id} is {job.status.replace('_', ' ')}; its content is there once it "
                                "has completed")
        suffix = job.request.suffix
        return FileResponse(service.store.result_path(job), media_type=_MEDIA_TYPES[suffix],
                            filename=f"{job.id}{suffix}")

    @router.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str) -> JSONResponse:
        job = find(video_id)
        try:
            service.store.delete(job)
        except K4TRTError as error:
            raise ApiError(409, str(error)) from None
        return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})

    @router.get("/metrics")
    async def metrics() -> Response:
        # In a thread: the replica count is a call to Ray Serve's controller.
        return Response(await asyncio.to_thread(service.metrics.render), media_type=CONTENT_TYPE)

    app.include_router(router)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app


async def _read_fields(request: Request) -> dict[str, object]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            fields = json.loads(await request.body())
        except ValueError:
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise ApiError(400, "the body must be a JSON object such as {\"prompt\": \"a fox\"}")
        return fields
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=1, max_fields=2 * len(FIELDS))
        except HTTPException as error:
            raise ApiError(400, f"the form could not be read: {error.detail}") from None
        fields: dict[str, object] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                raise ApiError(400, f"field {name!r} is a file; k4trt makes videos from a text prompt alone")
            if name in fields:
                raise ApiError(400, f"field {name!r} is given twice")
            fields[name] = value
        return fields
    raise ApiError(415, "send the body as application/json or multipart/form-data")
