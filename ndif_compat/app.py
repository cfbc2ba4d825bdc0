"""The HTTP + websocket server (starlette): the endpoints nnsight 0.8's remote backend calls.

``POST /request`` (multipart: ``data`` = the JSON envelope, ``blob`` = the payload) answers RECEIVED with the job
id; the job's later statuses go to the ``/subscribe`` websocket session named in the envelope and are kept for
``GET /response/{id}`` (non-blocking clients); ``GET /result/{id}`` downloads a result. ``/status``, ``/env``,
``/whoami`` and ``/ping`` answer nnsight's helpers; :mod:`ndif_compat.hub` answers the Hub calls of
``LanguageModel("<name>")``. Every failure is a typed :class:`~ndif_compat.errors.GatewayError`; the server keeps
serving.

Operators get one log line per request (logger ``ndif_compat.requests``, INFO): the client (its address, or a short
hash of its API key, never the key), what it ran (trace / generate / session), where (``hybrid``: pushed to the nodes;
``gateway/swarm``: on the gateway, decoder layers on the swarm; ``gateway/local``), bytes in and out, seconds and
the outcome (``ok`` or the error's type).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version

# anyio's asyncio backend (starlette spools uploads over 1 MiB through it) is imported before nnsight, which gives
# every object a ``save`` attribute that anyio's typed-attribute classes refuse when they are first defined.
from anyio._backends import _asyncio as _anyio_asyncio  # noqa: F401, I001  (must precede nnsight)
from nnsight.schema.request import RequestModel
from nnsight.schema.response import Status
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .auth import KeyRing
from .config import GatewayConfig
from .errors import BadRequestError, GatewayError, UnknownJobError
from .hub import HubFiles
from .protocol import Job, Subscriptions, check_model
from .workers import WorkerPool

logger = logging.getLogger(__name__)
request_log = logging.getLogger("ndif_compat.requests")
"""One line per request, for operators (see the module doc)."""


ENVELOPE_BYTES = 1 * 2**20
"""What an upload may carry besides its payload (the JSON envelope, multipart framing)."""


def _too_large(size: int, limit: int, qualifier: str = "") -> str:
    return (f"the request is {qualifier}{size} bytes; this gateway accepts payloads up to {limit} bytes "
            f"({limit / 2**20:g} MiB, swarm-gateway serve --max-request-mb). Send less: tensors the trace builds on "
            "the gateway instead of shipping them, or ask the operator to raise the limit.")


def _client_name(identity: str) -> str:
    """``addr:1.2.3.4`` as is; ``key:<secret>`` as ``key#<8 hex of its sha256>`` (logs never hold a key)."""
    kind, _, value = identity.partition(":")
    return f"key#{hashlib.sha256(value.encode()).hexdigest()[:8]}" if kind == "key" else identity


def _log_request(client: str, job_id: str, meta: dict, kind: str, wall_s: float, outcome: str) -> None:
    what = re.sub(r"[^a-z_]", "", str(meta.get("request", "?")))[:16] or "?"  # reported by the cell: sanitized
    path = {"hybrid": "hybrid", "gateway": f"gateway/{kind}"}.get(meta.get("path"), "-")
    request_log.info("request %s client=%s what=%s path=%s in=%dB out=%dB swarm=%d/%dB time=%.3fs outcome=%s",
                     job_id[:12], client, what, path, meta.get("request_bytes", 0), meta.get("result_bytes", 0),
                     meta.get("swarm_bytes_sent", 0), meta.get("swarm_bytes_received", 0), wall_s, outcome)


def _error(e: GatewayError) -> JSONResponse:
    return JSONResponse({"detail": f"{type(e).__name__}: {e}", "code": e.code}, status_code=e.http_status)


class Gateway:
    """The server state: jobs, websocket sessions, keys and the worker pool. :meth:`app` builds the ASGI app."""

    def __init__(self, config: GatewayConfig, pool: WorkerPool):
        self.config, self.pool = config, pool
        self.keys = KeyRing(config.api_keys, config.rate_per_minute, config.burst)
        self.jobs: dict[str, Job] = {}
        self.subscriptions = Subscriptions()
        self.hub = HubFiles(config.backend.model_path, config.names)
        self._threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="gateway-job")
        self._tasks: set[asyncio.Task] = set()

    def app(self) -> Starlette:
        routes = [
            Route("/request", self.submit, methods=["POST"]),
            WebSocketRoute("/subscribe", self.subscribe),
            Route("/response/{job_id}", self.poll, methods=["GET"]),
            Route("/result/{job_id}", self.result, methods=["GET"]),
            Route("/status", self.status, methods=["GET"]),
            Route("/env", self.env, methods=["GET"]),
            Route("/whoami", self.whoami, methods=["GET"]),
            Route("/ping", self.ping, methods=["GET"]),
            Route("/api/models/{repo:path}/tree/{rest:path}", self.hub.tree, methods=["GET"]),
            Route("/api/models/{repo:path}", self.hub.model_info, methods=["GET"]),
            Route("/{repo:path}/resolve/{revision}/{filename:path}", self.hub.resolve, methods=["GET", "HEAD"]),
        ]
        return Starlette(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        try:
            yield
        finally:
            self._threads.shutdown(wait=False, cancel_futures=True)

    # ---- requests ---------------------------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        t0, client = time.perf_counter(), f"addr:{request.client.host}"
        declared = request.headers.get("content-length", "")
        try:
            identity = self.keys.identify(request.headers.get("ndif-api-key"), request.client.host)
            client = _client_name(identity)
            self.keys.charge(identity)
            await self._read_body(request)
            try:
                form = await request.form(max_part_size=self.config.limits.max_request_bytes)
            except (HTTPException, MultiPartException, ValueError, KeyError) as e:
                detail = getattr(e, "detail", None) or e
                raise BadRequestError(f"POST /request must be multipart/form-data with the fields 'data' and "
                                      f"'blob' ({detail}); is this an nnsight 0.8 client?") from None
            if "data" not in form or "blob" not in form:
                raise BadRequestError("POST /request needs the form fields 'data' (JSON) and 'blob' (payload).")
            try:
                envelope = RequestModel.model_validate_json(form["data"])
            except ValueError as e:
                raise BadRequestError(f"the request envelope is not nnsight's RequestModel: {e}") from None
            check_model(envelope.model_key, self.config.names)
            blob = form["blob"]
            blob = await blob.read() if hasattr(blob, "read") else str(blob).encode()
            if len(blob) > self.config.limits.max_request_bytes:
                raise BadRequestError(_too_large(len(blob), self.config.limits.max_request_bytes))
        except GatewayError as e:
            _log_request(client, "-" * 12, {"request_bytes": int(declared) if declared.isdigit() else 0},
                         self.config.backend.kind, time.perf_counter() - t0, f"refused:{type(e).__name__}")
            return _error(e)
        job = Job(envelope.session_id, blob, envelope.compress, str(request.base_url).rstrip("/"))
        job.meta = {"request_bytes": len(blob)}
        self.jobs[job.id] = job
        received = job.response(Status.RECEIVED)
        job.latest = received
        task = asyncio.create_task(self._run(job, client, t0))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._purge()
        return Response(received.model_dump_json(), media_type="application/json")

    async def _read_body(self, request: Request) -> None:
        """Read the upload into memory, refusing it as soon as it passes the limit (declared or streamed), so no
        upload is spooled to disk or held past ``max_request_bytes`` (plus the envelope's allowance)."""
        limit = self.config.limits.max_request_bytes + ENVELOPE_BYTES
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BadRequestError(_too_large(int(declared), self.config.limits.max_request_bytes))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BadRequestError(_too_large(len(body), self.config.limits.max_request_bytes, "at least "))
        request._body = bytes(body)  # starlette's form parser reads the cached body

    def _emit(self, job: Job, status: Status, description: str | None = None) -> None:
        response = job.response(status, description)
        job.latest = response
        self.subscriptions.push(job.session_id, response.model_dump_json())

    async def _run(self, job: Job, client: str = "-", received_at: float | None = None) -> None:
        t0, outcome = received_at if received_at is not None else time.perf_counter(), "cancelled"
        try:
            outcome = await self._execute(job)
        finally:
            _log_request(client, job.id, job.meta, self.config.backend.kind, time.perf_counter() - t0, outcome)

    async def _execute(self, job: Job) -> str:
        """Run the job and push its answer; returns the outcome for the request log (``ok`` or the error type)."""
        loop = asyncio.get_running_loop()
        self._emit(job, Status.QUEUED)

        def on_log(text: str) -> None:
            loop.call_soon_threadsafe(self._emit, job, Status.LOG, text)

        def on_start() -> None:
            loop.call_soon_threadsafe(self._emit, job, Status.RUNNING)

        t0 = time.perf_counter()
        try:
            reply = await loop.run_in_executor(self._threads, self.pool.run, job.id, job.blob, job.compress, on_log,
                                               on_start)
        except GatewayError as e:
            job.meta["wall_s"] = time.perf_counter() - t0
            self._emit(job, Status.ERROR, f"{type(e).__name__}: {e}")
            job.finished = time.monotonic()
            return type(e).__name__
        except Exception as e:  # our bug: still an answer, never a hung client
            logger.exception("job %s failed inside the gateway", job.id)
            self._emit(job, Status.ERROR, f"GatewayError: internal error: {type(e).__name__}: {e}")
            job.finished = time.monotonic()
            return f"internal:{type(e).__name__}"
        job.blob = b""
        job.result = reply.result
        job.meta |= reply.meta | {"result_bytes": len(reply.result), "wall_s": time.perf_counter() - t0}
        job.latest = job.response(Status.COMPLETED, data=f"{job.base_url}/result/{job.id}")
        if len(reply.result) <= self.config.inline_result_bytes:
            frame = job.response(Status.COMPLETED, data=reply.result).pickle()
        else:
            frame = job.latest.model_dump_json()
        self.subscriptions.push(job.session_id, frame)
        job.finished = time.monotonic()
        return "ok"

    def _purge(self) -> None:
        now = time.monotonic()
        for job_id in [j.id for j in self.jobs.values() if j.finished and now - j.finished > self.config.result_ttl_s]:
            self.jobs.pop(job_id, None)

    # ---- status stream ----------------------------------------------------------------------------------------

    async def subscribe(self, websocket: WebSocket) -> None:
        # The key is checked where a job is submitted (POST /request), whose JSON error nnsight shows the
        # researcher; a refused websocket handshake would reach them as a bare "403 Forbidden". A subscription alone
        # only ever streams the statuses of jobs submitted with a valid key.
        await websocket.accept()
        session_id, q = self.subscriptions.open()
        try:
            await websocket.send_json({"session_id": session_id})
            receiver = asyncio.create_task(websocket.receive())
            while True:
                getter = asyncio.create_task(q.get())
                done, _ = await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
                if receiver in done:  # the client closed (or sent something we ignore)
                    getter.cancel()
                    if receiver.result().get("type") == "websocket.disconnect":
                        return
                    receiver = asyncio.create_task(websocket.receive())
                    continue
                message = getter.result()
                if isinstance(message, bytes):
                    await websocket.send_bytes(message)
                else:
                    await websocket.send_text(message)
        except (WebSocketDisconnect, RuntimeError):
            return
        finally:
            self.subscriptions.close(session_id)

    # ---- polling and downloads ----------------------------------------------------------------------------------

    def _job(self, request: Request) -> Job:
        job = self.jobs.get(request.path_params["job_id"])
        if job is None:
            raise UnknownJobError(f"no job {request.path_params['job_id']!r} on this gateway (expired after "
                                  f"{self.config.result_ttl_s:g} s, or never submitted).")
        return job

    async def poll(self, request: Request) -> Response:
        try:
            job = self._job(request)
        except GatewayError as e:
            return _error(e)
        return Response(job.latest.model_dump_json(), media_type="application/json")

    async def result(self, request: Request) -> Response:
        try:
            job = self._job(request)
            if job.result is None:
                raise UnknownJobError(f"job {job.id} has no result (status {job.latest.status.value}).")
        except GatewayError as e:
            return _error(e)
        return Response(job.result, media_type="application/octet-stream")

    # ---- service information ----------------------------------------------------------------------------------

    async def status(self, request: Request) -> Response:
        key = f"nnsight.modeling.language.LanguageModel:{{\"repo_id\": \"{self.config.names[0]}\", \"revision\": null}}"
        deployments = {name: {"model_key": key, "repo_id": name, "deployment_level": "HOT",
                              "application_state": "RUNNING", "backend": self.config.backend.kind}
                       for name in self.config.names}
        return JSONResponse({"deployments": deployments})

    async def env(self, request: Request) -> Response:
        packages = {name: version(name) for name in ("nnsight", "torch", "transformers")}
        return JSONResponse({"python_version": sys.version, "packages": packages})

    async def whoami(self, request: Request) -> Response:
        try:
            identity = self.keys.identify(request.headers.get("ndif-api-key"), request.client.host)
        except GatewayError as e:
            return _error(e)
        return JSONResponse({"identity": identity.split(":", 1)[0]})

    async def ping(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})
