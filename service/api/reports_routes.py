"""Routes of this area, included by the app factory."""

from fastapi import APIRouter

router = APIRouter()
