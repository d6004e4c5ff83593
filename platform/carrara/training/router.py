from fastapi import APIRouter

router = APIRouter(prefix="/runs", tags=["runs"])
