from fastapi import APIRouter

router = APIRouter(prefix="/deployments", tags=["deployments"])
