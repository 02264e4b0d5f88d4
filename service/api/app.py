"""The FastAPI application of the gateway: health probes, the studies API, reports, the dashboard and login.

Why a factory: `btd serve` builds one app from the process settings, and tests build one per settings
object (their own database, token, data directory) without touching the environment.

Access (service/api/auth.py): the probes, the login page and the dashboard's static files are open; every
other route, the OpenAPI description and its /docs page included, needs the view role once a credential is
configured, and the actions need the act role. FastAPI's own /docs and /openapi.json routes cannot take a
guard, so they are switched off and served here behind one.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute

from core.settings import Settings
from service.api import dashboard, health, login, references_routes, reports_routes, studies
from service.api.auth import Access, require_view, require_view_page
from service.api.params import ECHO_LIMIT, clip

# Every router of the app, in the order they are matched (tests walk them to check each route's guard).
ROUTERS = (
    health.router,
    login.router,
    studies.router,
    reports_routes.router,
    references_routes.router,
    dashboard.router,
)

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def _short_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors without the oversize input they complain about (a 100 kB UID is not sent back)."""
    out = []
    for error in errors:
        item = {key: error[key] for key in ("type", "loc", "msg") if key in error}
        item["msg"] = clip(item.get("msg", ""), 200)
        if "input" in error and len(str(error["input"])) <= ECHO_LIMIT:
            item["input"] = error["input"]
        out.append(item)
    return out


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": jsonable_encoder(_short_errors(exc.errors()))}, status_code=422)


def create_app(settings: Settings) -> FastAPI:
    """The REST API (OpenAPI docs at /docs, behind the view role) for these settings."""
    app = FastAPI(
        title="btd",
        description="Back-in-Time Diffusion tampering detector: studies, verdicts, reports",
        docs_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.access = Access(settings)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_view)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(require_view_page)])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="btd API")

    for router in ROUTERS:
        app.include_router(router)
    return app


def all_routes(app: FastAPI) -> list[APIRoute]:
    """The app's own routes (/openapi.json, /docs) and every route of its routers."""
    own = [route for route in app.router.routes if isinstance(route, APIRoute)]
    return own + [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]
