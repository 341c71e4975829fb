"""The HealthChain peer: a HealthChain (PyPI ``healthchain``) CDS Hooks service that answers every order-sign
call with one fixed card and decides nothing, at HealthChain's own paths (``/cds/cds-services/{id}``).

Runs in its own environment (bench/peer-requirements.txt): ``uvicorn bench.healthchain_peer:app``.
"""

from __future__ import annotations

from typing import Any

from healthchain.gateway import CDSHooksService, HealthChainAPI  # type: ignore[import-not-found]
from healthchain.models import CDSRequest, CDSResponse  # type: ignore[import-not-found]

SERVICE_ID = "coverage-requirements-order-sign"

app = HealthChainAPI(title="bench peer")
cds = CDSHooksService()

CARD: dict[str, Any] = {
    "summary": "Coverage information",
    "indicator": "info",
    "source": {"label": "bench"},
    "detail": "A fixed card: this service decides nothing.",
}


@cds.hook("order-sign", id=SERVICE_ID)  # type: ignore[untyped-decorator]
def order_sign(request: CDSRequest) -> CDSResponse:
    return CDSResponse(cards=[CARD])


app.register_service(cds)
