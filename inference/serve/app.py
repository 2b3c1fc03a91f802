"""The HTTP side of the online service: a Starlette app on uvicorn around one Engine at a time.

    python -m inference.serve --config configs/serve/sample.yaml [key=value ...]     # 127.0.0.1:8080 by default

Endpoints (JSON in and out; docs/SERVE.md has the examples):
    POST /v1/recommend  {"user_id": ..., "history": [item_id, ...], "event_types": [...], "k": 20, "exclude": [...]}
                        -> {"items", "scores", "source": "model" | "fallback", "model_version", "unknown_items", ...}
    POST /v1/search     {"query": "text", "history": [...], "event_types": [...], "k": 20, "exclude": [...],
                         "history_weight": 0.4}  -> {"items", "scores", "personalised", "history_weight",
                                                     "query_sharpness", ...}
    GET  /healthz       200 {"status": "ok", "model_version"} once a model is loaded (it is before the port opens)
    GET  /v1/model      what is served: model_version, loaded_at, catalogue size, settings, reload state
    GET  /metrics       Prometheus text format: requests, latency histogram, errors, unknown items, reloads

Bad input never reaches the model: malformed JSON (400), a body over max_body_bytes (413), an unknown field, a wrong
type, k out of range or a list over max_history_items (422) each get {"error": "<field>: <what is wrong>", "field"}.
Unknown item ids are counted (``unknown_items``), not fatal. An unexpected failure is a 500 for that request only.

Reload: every reload_poll_s seconds (and on SIGHUP) the service checks whether what it serves has changed (follow_recs: a
newer table; model_dir: another export.json or LATEST); if so it builds a new Engine in a background thread while
the old one keeps answering, then swaps one reference. A request holds the Engine it started with, so requests in
flight finish on the old model and none is dropped; a failed load keeps the old model (reported in /v1/model and
/metrics) and is not retried until the source changes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import traceback
from typing import Any, Callable

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from inference.serve.config import ServeConfig
from inference.serve.engine import Engine, RequestError, resolve_source

MAX_ID_CHARS = 512  # one item or user id
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class HTTPError(Exception):
    """Bad input: answered with ``status`` and {"error": "<field>: <message>", "field": field}."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message


# ============================================================================================ input checks
def _kind(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
            type(None): "null"}.get(type(v), type(v).__name__)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, max_bytes: int) -> dict:
    """The request body as a JSON object, read in chunks and refused past ``max_bytes`` (413) before it is parsed."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise HTTPError(413, "body", f"{int(declared)} bytes is over the limit of {max_bytes} (max_body_bytes)")
        except ValueError:
            raise HTTPError(400, "body", f"bad Content-Length header {declared!r}") from None
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_bytes:
            raise HTTPError(413, "body", f"over the limit of {max_bytes} bytes (max_body_bytes)")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise HTTPError(400, "body", "empty; send a JSON object")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, "body", f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HTTPError(422, "body", f"expected a JSON object, got {_kind(data)}")
    return data


def _check_fields(data: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise HTTPError(422, unknown[0], f"unknown field (this endpoint takes {', '.join(allowed)})")


def _id_list(data: dict, key: str, limit: int) -> list:
    v = data.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise HTTPError(422, key, f"expected a list of item ids, got {_kind(v)}")
    if len(v) > limit:
        raise HTTPError(422, key, f"{len(v)} items is over the limit of {limit} (max_history_items)")
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (str, int)):
            raise HTTPError(422, f"{key}[{i}]", f"expected an item id (string or integer), got {_kind(x)}")
        if isinstance(x, str) and len(x) > MAX_ID_CHARS:
            raise HTTPError(422, f"{key}[{i}]", f"an item id of {len(x)} characters is over the limit of {MAX_ID_CHARS}")
    return v


def _event_types(data: dict, n: int) -> list | None:
    v = data.get("event_types")
    if v is None:
        return None
    if not isinstance(v, list):
        raise HTTPError(422, "event_types", f"expected a list of event type names, got {_kind(v)}")
    if len(v) != n:
        raise HTTPError(422, "event_types", f"{len(v)} entries for {n} history items; give one per history item, or none")
    for i, x in enumerate(v):
        if not isinstance(x, str):
            raise HTTPError(422, f"event_types[{i}]", f"expected an event type name (string), got {_kind(x)}")
    return v


def _k(data: dict, cfg: ServeConfig) -> int:
    v = data.get("k", cfg.default_k)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise HTTPError(422, "k", f"expected an integer, got {_kind(v)}")
    if not 1 <= v <= cfg.max_k:
        raise HTTPError(422, "k", f"must be in 1..{cfg.max_k} (max_k), got {v}")
    return v


def _user_id(data: dict) -> Any:
    v = data.get("user_id")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and len(v) > MAX_ID_CHARS)):
        raise HTTPError(422, "user_id", f"expected a string or integer id (at most {MAX_ID_CHARS} characters), got {_kind(v)}")
    return v


def parse_recommend(data: dict, cfg: ServeConfig) -> dict:
    _check_fields(data, ("user_id", "history", "event_types", "k", "exclude"))
    history = _id_list(data, "history", cfg.max_history_items)
    return dict(user_id=_user_id(data), history=history, event_types=_event_types(data, len(history)), k=_k(data, cfg),
                exclude=_id_list(data, "exclude", cfg.max_history_items))


def parse_search(data: dict, cfg: ServeConfig) -> dict:
    _check_fields(data, ("user_id", "query", "history", "event_types", "k", "exclude", "history_weight"))
    q = data.get("query")
    if not isinstance(q, str):
        raise HTTPError(422, "query", f"expected the query text (string), got {_kind(q)}" if q is not None else "missing")
    if not q.strip():
        raise HTTPError(422, "query", "empty")
    if len(q) > cfg.max_query_chars:
        raise HTTPError(422, "query", f"{len(q)} characters is over the limit of {cfg.max_query_chars} (max_query_chars)")
    w = data.get("history_weight")
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0):
        raise HTTPError(422, "history_weight", f"expected a number in [0, 1], got {w!r}")
    history = _id_list(data, "history", cfg.max_history_items)
    return dict(user_id=_user_id(data), query=q, history=history, event_types=_event_types(data, len(history)),
                k=_k(data, cfg), exclude=_id_list(data, "exclude", cfg.max_history_items), history_weight=w)


# ============================================================================================ metrics
class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmrec_serve_requests", "Requests answered, by endpoint and HTTP status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("lmrec_serve_request_duration_seconds", "Time from the request's arrival to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("lmrec_serve_errors", "Requests answered with an error: kind client (4xx) or server (5xx)",
                              ["endpoint", "kind"], registry=r)
        self.in_flight = Gauge("lmrec_serve_in_flight_requests", "Requests being answered now", registry=r)
        self.unknown = Counter("lmrec_serve_unknown_items", "History items not in tonight's catalogue (dropped)", ["endpoint"], registry=r)
        self.fallback = Counter("lmrec_serve_fallback_responses", "Recommendations answered with the fallback list", registry=r)
        self.reloads = Counter("lmrec_serve_reloads", "Attempts to load a newly published model, by result", ["result"], registry=r)
        self.model_info = Gauge("lmrec_serve_model_info", "The model being served (value 1)", ["model_version", "data_version"], registry=r)
        self.catalogue = Gauge("lmrec_serve_catalogue_items", "Items in the served catalogue", registry=r)
        self.loaded = Gauge("lmrec_serve_model_loaded_timestamp_seconds", "When the served model was loaded (Unix time)", registry=r)

    def serving(self, engine: Engine, previous: Engine | None = None) -> None:
        if previous is not None:
            with contextlib.suppress(KeyError):
                self.model_info.remove(previous.model_version, previous.data_version)
        self.model_info.labels(engine.model_version, engine.data_version).set(1)
        self.catalogue.set(engine.n_items)
        self.loaded.set(time.time())


# ============================================================================================ the service
class Service:
    """The current Engine, the request pool and the reload loop; ``app`` is the Starlette application."""

    def __init__(self, cfg: ServeConfig, engine: Engine, log: Callable[[str], None] = print):
        self.cfg, self.engine, self.log = cfg, engine, log
        self.metrics = Metrics()
        self.metrics.serving(engine)
        self.limiter: anyio.CapacityLimiter | None = None  # made in the server's event loop (lifespan)
        self.reload_state: dict[str, Any] = {"reloads": 0, "last_check": None, "last_error": None, "failed_signature": None}
        self._wake: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        routes = [
            Route("/v1/recommend", self._endpoint("recommend", self.recommend), methods=["POST"]),
            Route("/v1/search", self._endpoint("search", self.search), methods=["POST"]),
            Route("/healthz", self._endpoint("healthz", self.healthz), methods=["GET"]),
            Route("/v1/model", self._endpoint("model", self.model), methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, lifespan=self._lifespan)

    # ------------------------------------------------------------------------------------------ plumbing
    def _endpoint(self, name: str, fn):
        """Wrap a handler: latency and status metrics, 4xx for bad input, 500 (logged) for anything else."""
        m = self.metrics

        async def handler(request: Request) -> Response:
            t0 = time.perf_counter()
            m.in_flight.inc()
            try:
                resp = await fn(request)
            except HTTPError as e:
                resp = JSONResponse({"error": str(e), "field": e.field}, status_code=e.status)
            except RequestError as e:
                resp = JSONResponse({"error": str(e), "field": e.field}, status_code=e.status)
            except Exception as e:  # a bug or a broken model: this request fails, the service stays up
                self.log(f"[serve] error in {name}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                resp = JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
            finally:
                m.in_flight.dec()
            m.latency.labels(name).observe(time.perf_counter() - t0)
            m.requests.labels(name, str(resp.status_code)).inc()
            if resp.status_code >= 400:
                m.errors.labels(name, "client" if resp.status_code < 500 else "server").inc()
            return resp

        return handler

    async def _compute(self, fn, *args):
        """Run the scoring in a worker thread (torch releases the GIL), at most compute_threads at once."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # ------------------------------------------------------------------------------------------ endpoints
    async def recommend(self, request: Request) -> Response:
        req = parse_recommend(await read_json(request, self.cfg.max_body_bytes), self.cfg)
        engine = self.engine  # this request's model, whatever a reload does meanwhile
        out = await self._compute(lambda: engine.recommend(req["history"], req["event_types"], req["k"], req["exclude"]))
        self.metrics.unknown.labels("recommend").inc(out["unknown_items"])
        if out["source"] == "fallback":
            self.metrics.fallback.inc()
        return JSONResponse({"user_id": req["user_id"], **out})

    async def search(self, request: Request) -> Response:
        req = parse_search(await read_json(request, self.cfg.max_body_bytes), self.cfg)
        engine = self.engine
        out = await self._compute(lambda: engine.search(req["query"], req["history"], req["event_types"], req["k"],
                                                        req["exclude"], req["history_weight"]))
        self.metrics.unknown.labels("search").inc(out["unknown_items"])
        return JSONResponse({"user_id": req["user_id"], **out})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model_version": self.engine.model_version})

    async def model(self, request: Request) -> Response:
        return JSONResponse({**self.engine.describe(), "reload": {**self.reload_state, "poll_s": self.cfg.reload_poll_s}})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------------------------------ reload
    async def check_reload(self) -> bool:
        """Load the source the config names now if it differs from the one served; True when a new model went live."""
        assert self._reload_lock is not None
        async with self._reload_lock:
            st = self.reload_state
            st["last_check"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            try:
                src = await anyio.to_thread.run_sync(resolve_source, self.cfg)
            except Exception as e:  # e.g. the followed folder is being rewritten: try at the next poll
                st["last_error"] = f"{type(e).__name__}: {e}"
                return False
            if src.signature == self.engine.source.signature or src.signature == st["failed_signature"]:
                return False
            self.log(f"[serve] new source {src.signature}: loading it while {self.engine.model_version} keeps serving")
            try:
                new = await anyio.to_thread.run_sync(lambda: Engine.load(self.cfg, src, log=self.log))
            except Exception as e:
                st.update(failed_signature=src.signature, last_error=f"{type(e).__name__}: {e}")
                self.metrics.reloads.labels("failed").inc()
                self.log(f"[serve] reload failed, still serving {self.engine.model_version}: {type(e).__name__}: {e}")
                return False
            old, self.engine = self.engine, new  # requests already running keep the Engine they hold
            st.update(reloads=st["reloads"] + 1, last_error=None, failed_signature=None)
            self.metrics.reloads.labels("ok").inc()
            self.metrics.serving(new, old)
            self.log(f"[serve] now serving {new.model_version} (was {old.model_version})")
            return True

    async def _reload_loop(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.reload_poll_s or None)
            self._wake.clear()
            try:
                await self.check_reload()
            except Exception as e:  # never let the loop die
                self.log(f"[serve] reload check failed: {type(e).__name__}: {e}")

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.limiter = anyio.CapacityLimiter(self.cfg.compute_threads)
        self._wake, self._reload_lock = asyncio.Event(), asyncio.Lock()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread / no SIGHUP
            loop.add_signal_handler(signal.SIGHUP, self._wake.set)
        task = asyncio.create_task(self._reload_loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
