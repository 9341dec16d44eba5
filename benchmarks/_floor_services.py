"""The HTTP floors of the scoring API: BentoML-hosted services that do nothing.

``bench_serving.py`` serves each in its own process (BentoML's metrics registry is
per process) and times them with the same client as ``/score``:

* ``AsgiFloor``: a Starlette app mounted with ``@bentoml.asgi_app``, as the
  scoring routes are, whose ``/score`` reads the body and answers a fixed JSON;
* ``ApiFloor``: a ``@bentoml.api`` method doing the same.
"""

from __future__ import annotations

from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_OPTIONS: dict[str, Any] = {
    "workers": 1,
    "logging": {"access": {"enabled": False}},
    "tracing": {"sample_rate": 0.0},
}


async def _noop(request: Request) -> Response:
    await request.body()
    return Response(b'{"customer_id":"C0"}', media_type="application/json")


_APP = Starlette(routes=[Route("/score", _noop, methods=["POST"])])


@bentoml.asgi_app(_APP, path="/")
@bentoml.service(name="asgi_floor", **_OPTIONS)
class AsgiFloor:
    """No-op ASGI route hosted by BentoML (the floor of ``/score``)."""


@bentoml.service(name="api_floor", **_OPTIONS)
class ApiFloor:
    """No-op ``@bentoml.api`` method."""

    @bentoml.api
    def score(self, customer_id: str) -> dict[str, str]:
        return {"customer_id": customer_id}
