"""create_app(config): the FastAPI app of `imat serve`.

    GET    /                           the search page (static HTML + JS, no data in it)
    POST   /v1/search                  multipart: image (one or more files), k, category (repeatable), match
                                       -> {"queries": [record, ...]} (the `imat search` JSONL record)
    POST   /v1/items                   multipart: image, id, categories (comma-separated) -> 201 (replaces an id)
    GET    /v1/items/{id}              the item; 404 when absent
    GET    /v1/items/{id}/thumbnail    JPEG, only for items in the index
    DELETE /v1/items/{id}              200; 404 when absent
    GET    /v1/info                    model, index and category names (what the page needs)
    GET    /healthz /readyz /metrics   liveness, readiness, Prometheus text
    GET    /docs /openapi.json         FastAPI's OpenAPI docs

Every error is JSON {"error": {"status", "message"}} with a 4xx code for the client's
mistakes (413 over the upload limit, 401 without the API key, 503 + Retry-After when the
model queue is full). With --api-key-file, writes need `Authorization: Bearer KEY` (or
`X-API-Key: KEY`); with --protect-reads every /v1 route and /metrics do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import importlib.resources
import logging
import time
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from imat import __version__
from imat.engine.embedder import EmbedError
from imat.errors import ImageDecodeError, ImatError
from imat.serve.batcher import ModelBatcher, QueueFull
from imat.serve.config import MAX_K, ServeConfig
from imat.serve.live_index import LiveIndex, thumbnail_jpeg
from imat.serve.metrics import ServeMetrics
from imat.serve.uploads import BadRequest, BodyLimit, check_item_id, decode_upload, parse_categories

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class ServeState:
    """Everything one server holds: engine, batcher, live index, metrics, decoder pool."""

    def __init__(self, config: ServeConfig):
        from imat.engine import Engine

        self.config = config
        self.api_key = config.read_api_key()
        self.metrics = ServeMetrics()
        self.engine = Engine(config.model, decode_threads=config.decode_threads, batch_size=config.max_batch,
                             intra_op_threads=config.intra_op_threads, progress=False)
        self.index = LiveIndex(self.engine, config.index, config.state_dir, snapshot_every=config.snapshot_every,
                               thumbnail_px=config.thumbnail_px, metrics=self.metrics)
        self.batcher = ModelBatcher(self.engine.session, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                                    queue_limit=config.queue_limit, batching=config.batching, metrics=self.metrics)
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(config.decode_threads,
                                                                 thread_name_prefix="imat-serve-decode")
        m = self.metrics
        m.gauge("imat_queue_images", "Images waiting for the model.", lambda: self.batcher.queue_depth)
        m.gauge("imat_index_items", "Items a search can return.", lambda: self.index.count)
        m.gauge("imat_index_tombstones", "Removed rows still inside an HNSW graph.",
                lambda: self.index.gallery.tombstones)
        m.gauge("imat_journal_pending", "Acknowledged writes not yet folded into the index folder.",
                lambda: self.index.journal.pending)
        self.closed = False

    def start(self) -> None:
        self.batcher.start()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.batcher.stop()
        self.decode_pool.shutdown(wait=True)
        self.index.close()

    @property
    def ready(self) -> bool:
        return self.batcher.running and not self.closed

    # ------------------------------------------------------------ the model path

    async def decode(self, uploads: list[UploadFile]) -> tuple[list[str], list[np.ndarray | None], list[EmbedError]]:
        """(query names, decoded images or None, errors) for the uploads, decoded in the thread pool."""
        meta = self.engine.metadata
        loop = asyncio.get_running_loop()
        names = [u.filename or f"image-{i}" for i, u in enumerate(uploads)]
        datas = [await u.read() for u in uploads]

        async def one(i: int):
            if not datas[i]:
                raise ImageDecodeError(names[i], "empty upload (0 bytes)")
            return await loop.run_in_executor(self.decode_pool, decode_upload, datas[i], names[i], meta.image_size,
                                              meta.resize_mode, self.config.max_pixels)

        results = await asyncio.gather(*(one(i) for i in range(len(uploads))), return_exceptions=True)
        images: list[np.ndarray | None] = []
        errors: list[EmbedError] = []
        for i, r in enumerate(results):
            if isinstance(r, ImageDecodeError):
                images.append(None)
                errors.append(EmbedError(i, names[i], r.reason))
            elif isinstance(r, BaseException):
                raise r
            else:
                images.append(r)
        return names, images, errors

    async def embed(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        try:
            future = self.batcher.submit(np.stack(images))
        except QueueFull as e:
            raise ServiceBusy(str(e)) from None
        return await asyncio.wrap_future(future)


class ServiceBusy(Exception):
    pass


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")]
        field = ".".join(loc) or "request"
        parts.append(f"field {field!r}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class Metered:
    """ASGI middleware: request count by route template and status, and latency by route."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.inc(route=path, method=scope.get("method", ""), status=status["code"])
            self.metrics.latency.observe(time.perf_counter() - start, route=path)


def create_app(config: ServeConfig) -> FastAPI:
    """Load the model and the index (replaying the journal) and return the app; the model worker
    starts with the app's lifespan and the last snapshot is written when it ends."""
    state = ServeState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.close)

    app = FastAPI(title="imat serve", version=__version__, lifespan=lifespan,
                  description="Fashion image search over an imat index: search, add, delete, filter by category.")
    app.state.imat = state
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes)
    app.add_middleware(Metered, metrics=state.metrics)

    # ------------------------------------------------------------ errors

    @app.exception_handler(BadRequest)
    async def _bad_request(request, exc: BadRequest):
        return _error(exc.status, exc.message)

    @app.exception_handler(ImatError)
    async def _imat_error(request, exc: ImatError):
        return _error(400, str(exc))

    @app.exception_handler(ServiceBusy)
    async def _busy(request, exc: ServiceBusy):
        return _error(503, f"busy: {exc}; retry after {RETRY_AFTER_S}s", {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return _error(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    # ------------------------------------------------------------ API key

    def _check_key(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), state.api_key.encode()):
            raise StarletteHTTPException(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                         headers={"WWW-Authenticate": "Bearer"})

    def require_write(request: Request) -> None:
        _check_key(request)

    def require_read(request: Request) -> None:
        if config.protect_reads:
            _check_key(request)

    # ------------------------------------------------------------ page and probes

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(importlib.resources.files("imat.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/healthz", tags=["probes"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"])
    async def readyz():
        if not state.ready:
            return _error(503, "not ready: the model worker is not running")
        return {"status": "ready", "items": state.index.count}

    @app.get("/metrics", response_class=PlainTextResponse, tags=["probes"], dependencies=[Depends(require_read)])
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/info", dependencies=[Depends(require_read)])
    async def info():
        meta = state.engine.metadata
        g = state.index.gallery
        return {"imat_version": __version__,
                "model": {"architecture": meta.architecture, "objective": meta.objective,
                          "image_size": meta.image_size, "embedding_dim": meta.embedding_dim},
                "index": {"index_type": g.index_type, "items": state.index.count, "labelled": g.labelled},
                "categories": state.index.category_names(),  # the names some item in the index has
                "model_categories": list(meta.category_names),
                "limits": {"max_k": MAX_K, "max_images": config.max_images,
                           "max_upload_bytes": config.max_upload_bytes},
                "writes_need_key": state.api_key is not None, "reads_need_key": config.protect_reads}

    # ------------------------------------------------------------ search

    @app.post("/v1/search", dependencies=[Depends(require_read)])
    async def search(image: Annotated[list[UploadFile], File(description="one or more query images")],
                     k: Annotated[int, Form(description=f"neighbours per query, 1..{MAX_K}")] = config.default_k,
                     category: Annotated[list[str] | None, Form(description="only items of this category "
                                                                "(repeatable)")] = None,
                     match: Annotated[str, Form(description="any | all (with several categories)")] = "any"):
        """Search the index with one or more images; one record per image (the `imat search` JSONL record)."""
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"form field 'k' must be between 1 and {MAX_K}, got {k}")
        if match not in ("any", "all"):
            raise BadRequest(f"form field 'match' must be 'any' or 'all', got {match!r}")
        if len(image) > config.max_images:
            raise BadRequest(f"{len(image)} images in one search; at most {config.max_images} (--max-images)")
        categories = [c.strip() for c in (category or []) if c.strip()] or None
        names, images, errors = await state.decode(image)
        ok = [i for i, im in enumerate(images) if im is not None]
        if not ok:
            raise BadRequest("no uploaded image could be decoded: " + "; ".join(str(e) for e in errors[:5]))
        outputs = await state.embed([images[i] for i in ok])
        records = await run_in_threadpool(state.index.search, names, outputs["embedding"],
                                          np.asarray(ok, dtype=np.int64), errors, k,
                                          probabilities=outputs.get("probabilities"), categories=categories,
                                          match=match)
        return {"queries": records}

    # ------------------------------------------------------------ items

    def _item_view(item: dict) -> dict:
        return {"id": item["id"], "path": item.get("path"), "categories": item.get("categories", []),
                "thumbnail": f"/v1/items/{item['id']}/thumbnail"}

    @app.post("/v1/items", status_code=201, dependencies=[Depends(require_write)])
    async def add_item(image: Annotated[UploadFile, File(description="the item's image")],
                       id: Annotated[str, Form(description="item id (replaces an item with the same id)")],
                       categories: Annotated[list[str] | None, Form(
                           description="comma-separated category names (or the field repeated); names that "
                                       "contain commas, such as 'bag, wallet', are recognised")] = None):
        """Add an item (or replace the item with this id); durable when answered."""
        item_id = check_item_id(id)
        known = frozenset(state.index.category_names()) | frozenset(state.engine.metadata.category_names)
        names = parse_categories(categories or [], known)
        _, images, errors = await state.decode([image])
        if errors:
            raise BadRequest(f"form field 'image': {errors[0]}")
        outputs = await state.embed([images[0]])
        await image.seek(0)
        data = await image.read()
        thumb = await asyncio.get_running_loop().run_in_executor(
            state.decode_pool, thumbnail_jpeg, data, config.thumbnail_px)
        replaced = await run_in_threadpool(state.index.upsert, item_id, names, outputs["embedding"][0], thumb)
        item = {"id": item_id, "path": None, "categories": names}
        return {"item": _item_view(item), "replaced": replaced}

    @app.get("/v1/items/{item_id}", dependencies=[Depends(require_read)])
    async def get_item(item_id: str):
        item = state.index.get(item_id)
        if item is None:
            raise BadRequest(f"no item with id {item_id!r} in the index", status=404)
        return {"item": _item_view(item)}

    @app.get("/v1/items/{item_id}/thumbnail", dependencies=[Depends(require_read)],
             responses={200: {"content": {"image/jpeg": {}}}})
    async def get_thumbnail(item_id: str):
        data = await run_in_threadpool(state.index.thumbnail, item_id)
        if data is None:
            raise BadRequest(f"no item with id {item_id!r} and an image in the index", status=404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    @app.delete("/v1/items/{item_id}", dependencies=[Depends(require_write)])
    async def delete_item(item_id: str):
        """Delete an item; durable when answered."""
        if not await run_in_threadpool(state.index.delete, item_id):
            raise BadRequest(f"no item with id {item_id!r} in the index", status=404)
        return {"deleted": item_id}

    return app

