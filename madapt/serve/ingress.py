"""`OpenAIIngress`: the OpenAI-compatible HTTP API in front of the `AdapterServer` replicas; it only routes.

Each route authenticates (API keys) and hands the request on to its endpoint in `madapt.serve.openai`:
`/v1/completions` and `/v1/chat/completions` (which bound and parse the request, resolve `coding` to the
version it serves: labels, traffic splits, the newest, `default` the `active` adapter; fill in the
`generation` defaults the request does not set, and route to replicas that already hold the adapter),
`/v1/models`. Every error, Starlette's own included, answers in OpenAI's shape.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` as a class, not a string.
import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from madapt.serve.args import ServeArgs, sampling_defaults
from madapt.serve.auth import UNAUTHORIZED, ApiKeys
from madapt.serve.metrics import SplitMetrics
from madapt.serve.openai.errors import ProtocolError, validation_refusal
from madapt.serve.openai.serving import REPLICA_GONE
from madapt.serve.openai.serving_chat import OpenAIServingChat
from madapt.serve.openai.serving_completion import OpenAIServingCompletion
from madapt.serve.openai.serving_models import OpenAIServingModels
from madapt.store import AdapterStore
from madapt.store.releases import Resolver

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 5.0

# The docs routes are the ingress's own (below), so that they need the API key when keys are on.
api = FastAPI(
    title="madapt",
    description="OpenAI-compatible multi-adapter LoRA serving.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@api.exception_handler(ProtocolError)
async def protocol_error(_: Request, error: ProtocolError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@api.exception_handler(HTTPException)
async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own answers (an unknown route, a wrong method) in OpenAI's error shape."""
    where = f"{request.method} {request.url.path[:200]}"
    if error.status_code == 404:
        refusal = ProtocolError(404, f"unknown URL: {where}", code="unknown_url")
    elif error.status_code == 405:
        refusal = ProtocolError(405, f"method not allowed: {where}", headers=error.headers)
    else:
        refusal = ProtocolError(error.status_code, str(error.detail), headers=error.headers)
    return await protocol_error(request, refusal)


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """A route parameter FastAPI refused: the same 400 as a body's (its `loc` starts with `path`/`query`)."""
    return await protocol_error(request, validation_refusal(list(error.errors()), skip=1))


@api.exception_handler(Exception)
async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """The last resort: a bug is a 500 in OpenAI's shape, naming only the exception's type."""
    log.error("%s %s failed", request.method, request.url.path[:200], exc_info=error)
    return await protocol_error(request, ProtocolError(500, f"internal server error ({type(error).__name__})"))


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, server: DeploymentHandle, args: dict[str, Any]):
        self.server = server
        self.settings = ServeArgs.model_validate(args)
        self.keys = ApiKeys.load(self.settings.api_keys_file, self.settings.api_keys_env)
        self.splits = SplitMetrics()
        resolver = Resolver(AdapterStore(self.settings.store), ttl_s=self.settings.resolve_ttl_s)
        self.serving_models = OpenAIServingModels(self.settings, resolver)
        endpoint = (server, self.settings, sampling_defaults(self.settings), self.serving_models, self.splits)
        self.completion = OpenAIServingCompletion(*endpoint)
        self.chat = OpenAIServingChat(*endpoint)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """The ingress is up (it says nothing of the model replicas: that is /readyz)."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict[str, str]:
        """A model replica answers within READY_TIMEOUT_S: what a load balancer should route by."""
        try:
            await asyncio.wait_for(self.server.stats.remote(), timeout=READY_TIMEOUT_S)
        except (*REPLICA_GONE, TimeoutError) as error:
            raise ProtocolError(503, f"no model replica answered: {type(error).__name__}", code="not_ready") from None
        return {"status": "ready"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        """Base and every adapter: what `NAME` serves (`version`), its `versions`, `aliases` and `split`."""
        self._authorize(request)
        return (await self.serving_models.listing()).model_dump()

    @api.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        """One model: `base`, an adapter (what `NAME` serves) or `NAME@VERSION`, `NAME@LABEL`, `NAME@latest`."""
        self._authorize(request)
        return (await self.serving_models.card(model_id)).model_dump()

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(request.app.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        self._authorize(request)
        schema = request.scope.get("root_path", "") + "/openapi.json"
        return get_swagger_ui_html(openapi_url=schema, title="madapt API")

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> HTMLResponse:
        self._authorize(request)
        return get_redoc_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title="madapt API")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        return await self.completion.create(request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        return await self.chat.create(request)

    def _authorize(self, http: Request) -> None:
        if self.keys is not None and not self.keys.allows(http.headers.get("authorization")):
            raise ProtocolError(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})

    def split_stats(self) -> dict[str, int]:
        """Requests per split arm and status seen by this ingress replica, as 'model|arm|status' -> count."""
        return self.splits.stats()
