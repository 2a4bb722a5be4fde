"""The FastAPI application: inspection API, history, operator feedback, threshold view, dashboard."""

from __future__ import annotations

import tempfile
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParameter
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from . import analysis
from .blobs import BlobStore
from .config import ServeConfig, valid_model_name
from .export import export_zip
from .inspection import LoadedModel, Upload, analyse, persist
from .metrics import ServiceMetrics
from .middleware import TOKEN_COOKIE, BodyLimit, BodyTooLarge, RequestMetrics, TokenAuth, token_valid
from .pool import InferencePool, Overloaded
from .store import InspectionFilter, InspectionStore

DASHBOARD = Path(__file__).parent / "dashboard"
IMAGE_FIELD = "image"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        self.status, self.code, self.message, self.headers = status, code, message, headers
        super().__init__(message)


#: An inspection id as the database stores it (a signed 64-bit integer): larger ones are a 422,
#: not an overflow deep in the database driver.
MAX_ID = 2**63 - 1
InspectionId = Annotated[int, PathParameter(ge=1, le=MAX_ID)]


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class VerdictIn(BaseModel):
    verdict: Literal["normal", "anomalous"]
    operator: str | None = Field(default=None, max_length=64)
    note: str | None = Field(default=None, max_length=2000)


class LoginIn(BaseModel):
    token: str = Field(max_length=512)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"


def public_record(row: dict) -> dict:
    """A stored inspection as the API shows it: files as URLs, times in UTC ISO 8601."""
    base = f"/v1/inspections/{row['id']}"
    return {
        "id": row["id"], "created_at": _iso(row["created_at"]), "model": row["model"],
        "source_name": row["source_name"], "width": row["width"], "height": row["height"],
        "score": row["score"], "threshold": row["threshold"], "label": row["label"],
        "inference_ms": row["inference_ms"], "verdict": row["verdict"], "verdict_by": row["verdict_by"],
        "verdict_at": _iso(row["verdict_at"]), "image_url": f"{base}/image",
        "overlay_url": f"{base}/overlay.png" if row["overlay_key"] else None,
        "map_url": f"{base}/map.npy" if row["map_key"] else None,
    }


def create_app(config: ServeConfig, models: dict[str, LoadedModel] | None = None) -> FastAPI:
    """Build the service. ``models`` are loaded from ``config.models`` when not given."""
    config.check_exposure()
    if models is None:
        models = {name: LoadedModel.load(name, path, config.runtime) for name, path in config.models.items()}
    data_dir = Path(config.data_dir)
    store = InspectionStore(config.database_url)
    blobs = BlobStore(data_dir / "blobs")
    pool = InferencePool(config.workers, config.queue)
    metrics = ServiceMetrics(pool)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        # uvicorn has stopped accepting and waited for in-flight requests; finish any job they left.
        pool.shutdown()
        store.close()

    app = FastAPI(title="defectlens inspection service", version=__version__, lifespan=lifespan,
                  docs_url="/v1/docs", redoc_url=None, openapi_url="/v1/openapi.json")
    app.state.config, app.state.store, app.state.blobs, app.state.pool = config, store, blobs, pool
    app.state.models, app.state.metrics = models, metrics

    # -- errors: one JSON shape for every 4xx/5xx --------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_request, error: ApiError):
        return _error(error.status, error.code, error.message, error.headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request, error: BodyTooLarge):
        metrics.rejected.labels("too_large").inc()
        return _error(413, "too_large", str(error))

    @app.exception_handler(Overloaded)
    async def _overloaded(_request, error: Overloaded):
        metrics.rejected.labels("overloaded").inc()
        return _error(503, "overloaded", str(error), {"Retry-After": str(error.retry_after)})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, error: StarletteHTTPException):
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
        return _error(error.status_code, codes.get(error.status_code, "http_error"), str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, error: RequestValidationError):
        problems = []
        for item in error.errors():
            where = " ".join(str(part) for part in item.get("loc", ()))
            problems.append(f"{where}: {item.get('msg')}")
        return _error(422, "invalid_request", "; ".join(problems) or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(_request, error: Exception):
        # Logged by the server with its traceback; the client gets the same JSON shape as any error.
        return _error(500, "internal_error", f"the service failed on this request ({type(error).__name__}); see its log")

    def model_named(name: str) -> LoadedModel:
        if not valid_model_name(name) or name not in models:
            raise ApiError(404, "unknown_model", f"no model named {name!r}; this service serves: {', '.join(sorted(models))}")
        return models[name]

    def inspection(inspection_id: int) -> dict:
        row = store.get(inspection_id)
        if row is None:
            raise ApiError(404, "not_found", f"no inspection {inspection_id}")
        return row

    # -- service -------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/dashboard/index.html")

    @app.get("/healthz")
    async def healthz():
        # Unhealthy when an inspection could not be stored: a load balancer then stops sending work.
        problem = await run_in_threadpool(lambda: store.unusable() or blobs.unusable())
        if problem:
            raise ApiError(503, "unavailable", f"cannot store inspections: {problem}")
        return {"status": "ok", "version": __version__, "models": sorted(models), "queue": pool.pending,
                "capacity": pool.capacity}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.post("/v1/login")
    async def login(body: LoginIn):
        """Trade the API token for an HttpOnly cookie, so the dashboard's images load without headers."""
        if config.tokens and not token_valid(body.token, config.tokens):
            raise ApiError(401, "unauthorized", "invalid API token")
        response = Response(status_code=204)
        response.set_cookie(TOKEN_COOKIE, body.token, httponly=True, samesite="strict", path="/")
        return response

    @app.get("/v1/models")
    async def list_models():
        return {"models": [models[name].describe() for name in sorted(models)]}

    # -- inspecting ----------------------------------------------------------------------------
    @app.post("/v1/models/{name}/inspect")
    async def inspect(name: str, request: Request, raw_map: bool = False):
        """Multipart upload: one or more files in fields named 'image'. Every image gets a score,
        a label from the model's threshold, and its heatmap; all are stored before the answer."""
        model = model_named(name)
        if pool.full:  # refuse before reading the body, the cheapest moment
            raise Overloaded(pool.retry_after())
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(415, "not_multipart",
                           f"send the image as multipart/form-data in a field named '{IMAGE_FIELD}'")
        form = await request.form(max_files=config.max_batch, max_fields=config.max_batch + 8)
        parts = [value for key, value in form.multi_items() if key == IMAGE_FIELD]
        files = [value for value in parts if isinstance(value, UploadFile)]
        if len(files) < len(parts):  # a part without a filename arrives as text: refused, never dropped
            texts = [number for number, value in enumerate(parts, 1) if not isinstance(value, UploadFile)]
            raise ApiError(422, "no_image", f"field '{IMAGE_FIELD}' holds text (part {', '.join(map(str, texts))} of "
                           f"{len(parts)}: no filename); send each image as a file upload")
        if not files:
            fields = ", ".join(sorted({f"'{key}'" for key in form.keys()})) or "none"
            raise ApiError(422, "no_image", f"no file in a multipart field named '{IMAGE_FIELD}' (fields sent: {fields})")
        uploads = [Upload(f.filename or f"upload-{i}", await f.read()) for i, f in enumerate(files)]
        await form.close()
        results = await pool.run(analyse, model, uploads, config.max_pixels)
        if all(r.error for r in results):
            problems = "; ".join(f"{r.name}: {r.error}" for r in results)
            metrics.rejected.labels("bad_image").inc()
            raise ApiError(422, "bad_image", problems)
        rows = await run_in_threadpool(persist, store, blobs, model, results)
        items = []
        for result, row in zip(results, rows):
            if row is None:
                items.append({"source_name": result.name, "error": result.error})
                continue
            metrics.inspected(name, result.label, result.seconds)
            item = public_record(row)
            if raw_map and result.anomaly_map is not None:
                item["map"] = result.anomaly_map.tolist()
            items.append(item)
        return {"model": name, "threshold": model.detector.threshold, "items": items}

    # -- history ---------------------------------------------------------------------------------
    @app.get("/v1/inspections")
    async def list_inspections(
        model: str | None = None,
        label: Literal["normal", "anomalous"] | None = None,
        verdict: Literal["normal", "anomalous", "none"] | None = None,
        since: datetime | None = Query(None, description="UTC, ISO 8601"),
        until: datetime | None = Query(None, description="UTC, ISO 8601"),
        before_id: int | None = Query(None, ge=1, le=MAX_ID),
        after_id: int | None = Query(None, ge=0, le=MAX_ID),
        limit: int = Query(50, ge=1, le=500),
    ):
        if model is not None:
            model_named(model)
        filters = InspectionFilter(model, label, verdict, _naive_utc(since), _naive_utc(until))
        rows = await run_in_threadpool(store.list, filters, limit, before_id, after_id)
        items = [public_record(row) for row in rows]
        more = len(rows) == limit
        return {"items": items, "next_before_id": items[-1]["id"] if more and items else None}

    @app.get("/v1/inspections/{inspection_id}")
    async def get_inspection(inspection_id: InspectionId):
        return public_record(inspection(inspection_id))

    @app.get("/v1/inspections/{inspection_id}/image")
    async def get_image(inspection_id: InspectionId):
        return FileResponse(blobs.path(inspection(inspection_id)["image_key"]))

    @app.get("/v1/inspections/{inspection_id}/overlay.png")
    async def get_overlay(inspection_id: InspectionId):
        row = inspection(inspection_id)
        if not row["overlay_key"]:
            raise ApiError(404, "no_map", f"inspection {inspection_id} has no heatmap (its method gives no maps)")
        return FileResponse(blobs.path(row["overlay_key"]), media_type="image/png")

    @app.get("/v1/inspections/{inspection_id}/map.npy")
    async def get_map(inspection_id: InspectionId):
        row = inspection(inspection_id)
        if not row["map_key"]:
            raise ApiError(404, "no_map", f"inspection {inspection_id} has no anomaly map (its method gives no maps)")
        return FileResponse(blobs.path(row["map_key"]), media_type="application/octet-stream",
                            filename=f"inspection-{inspection_id}.npy")

    @app.post("/v1/inspections/{inspection_id}/verdict")
    async def set_verdict(inspection_id: InspectionId, body: VerdictIn):
        """The operator confirms (same as the label) or overrides (the other one) a verdict."""
        row = await run_in_threadpool(store.set_verdict, inspection_id, body.verdict, body.operator, body.note)
        if row is None:
            raise ApiError(404, "not_found", f"no inspection {inspection_id}")
        return public_record(row)

    # -- thresholds, drift, feedback -------------------------------------------------------------
    @app.get("/v1/models/{name}/threshold-view")
    async def threshold_view(name: str, threshold: float | None = Query(None, allow_inf_nan=False, ge=-1e15, le=1e15),
                             recent: int = Query(500, ge=1, le=100_000),
                             bins: int = Query(30, ge=2, le=200)):
        """Histograms of held-out normal and recent scores; the rates at ``threshold`` (default: the
        model's own); drift of recent scores from the normal ones."""
        model = model_named(name)
        normal = np.asarray(model.detector.normal_scores if model.detector.normal_scores is not None else [], float)
        history = await run_in_threadpool(store.recent_scores, name, recent)
        defects = np.asarray(await run_in_threadpool(store.verdict_scores, name, "anomalous"), float)
        goods = np.asarray(await run_in_threadpool(store.verdict_scores, name, "normal"), float)
        recent_scores = np.asarray([score for score, _ in history], float)
        chosen = threshold if threshold is not None else model.detector.threshold
        marks = [v for v in (chosen, model.detector.threshold) if v is not None]
        return {
            "model": name, "model_threshold": model.detector.threshold,
            "histogram": analysis.histograms({"normal": normal, "recent": recent_scores}, bins, marks),
            "at": None if chosen is None else analysis.at_threshold(chosen, normal, recent_scores, defects, goods),
            "drift": analysis.drift(recent_scores, normal),
        }

    @app.get("/v1/models/{name}/confirmed-good.zip")
    async def confirmed_good(name: str):
        """Images an operator confirmed as good, as MODEL/train/good/ — `defectlens fit MODEL/` refits on them."""
        model_named(name)
        spool = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)
        await run_in_threadpool(export_zip, store, blobs, name, spool)
        spool.seek(0)
        return StreamingResponse(_chunks(spool), media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="{name}-confirmed-good.zip"'})

    app.mount("/dashboard", StaticFiles(directory=DASHBOARD, html=True), name="dashboard")

    # The last added runs first: count every request, answer CORS preflights (only when origins are
    # configured), refuse unauthenticated requests, then oversized bodies.
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes, metrics=metrics)
    app.add_middleware(TokenAuth, tokens=tuple(config.tokens))
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def _chunks(spool, size: int = 1024 * 1024):
    with spool:
        while chunk := spool.read(size):
            yield chunk


def _naive_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)
