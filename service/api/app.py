"""The FastAPI application of the gateway: health probes, the studies API, reports and the dashboard.

Why a factory: `btd serve` builds one app from the process settings, and tests build one per settings
object (their own database, token, data directory) without touching the environment.
"""

from __future__ import annotations

from fastapi import FastAPI

from core.settings import Settings
from service.api import dashboard, health, references_routes, reports_routes, studies


def create_app(settings: Settings) -> FastAPI:
    """The REST API (OpenAPI docs at /docs) for these settings."""
    app = FastAPI(
        title="btd",
        description="Back-in-Time Diffusion tampering detector: studies, verdicts, reports",
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    app.include_router(health.router)
    app.include_router(studies.router)
    app.include_router(reports_routes.router)
    app.include_router(references_routes.router)
    app.include_router(dashboard.router)
    return app
