"""The baseline: a bare Starlette app on uvicorn that parses the same JSON body and answers {"cards": []}."""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def hook(request: Request) -> JSONResponse:
    json.loads(await request.body())
    return JSONResponse({"cards": []})


app = Starlette(routes=[Route("/cds-services/{service_id}", hook, methods=["POST"])])
