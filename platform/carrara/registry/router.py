from fastapi import APIRouter

router = APIRouter(prefix="/models", tags=["models"])
