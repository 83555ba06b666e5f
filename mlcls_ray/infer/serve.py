"""The HTTP labeling endpoint: Ray Serve with a FastAPI ingress, dynamic batching, PaddleX's serving schema.

``Global.mode=serve`` runs it in the foreground (:func:`run_serve`); ``serve deploy cluster/serve.yaml`` and KubeRay's
RayService build it from ``import_path: mlcls_ray.infer.serve:build_app`` (:func:`build_app`). Both take their
settings from :mod:`mlcls_ray.infer.serve_settings`, the one place that maps them to replicas, batching and autoscaling.

Each request's image is decoded and resized on the replica's decode threads (on CPU) and joins a ``@serve.batch`` of
up to ``max_batch_size`` images for one forward pass on its model thread; on a GPU the file's bytes join the batch
and JPEGs are decoded on the device (:meth:`Predictor.score_encoded`). URLs are fetched on threads of their own
(:mod:`mlcls_ray.infer.fetch`). Every pool is bounded, and so are a request's bytes and an image's pixels, so a
handful of requests cannot exhaust a replica's memory. Bad input is answered with a 4xx whose ``errorCode`` is the
HTTP status (as PaddleX does) and whose ``errorMsg`` says what was wrong; it never reaches the model and never
restarts a replica.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at runtime, and through
# Serve's ingress wrapper it cannot resolve them from strings
import asyncio
import base64
import binascii
import collections
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics
from ray.serve.deployment import Application
from starlette.exceptions import HTTPException

from mlcls_ray import model_dir as model_folder
from mlcls_ray.config import Config
from mlcls_ray.data.images import ImageDecodeError
from mlcls_ray.devices import torch_device
from mlcls_ray.infer import thresholds as thr
from mlcls_ray.infer.fetch import RequestError, fetch_url
from mlcls_ray.infer.predictor import Predictor
from mlcls_ray.infer.serve_settings import ServeSettings, deployment_options, settings_from_config

__all__ = ["APP_NAME", "ROUTE", "build_app", "probe", "run_serve"]

APP_NAME = "mlcls"
ROUTE = "/multilabel-image-classification"
_JSON_SLACK = 64 << 10  # room for the threshold and the JSON around the base64 image(s)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
logger = logging.getLogger(__name__)


def probe(predictor: Predictor) -> None:
    """A forward pass on one blank image, for Serve's health check.

    Raises:
        RuntimeError: the model's scores are not finite or not of the model's shape.
    """
    size = predictor.image_size
    probs = predictor.probabilities(np.zeros((1, size, size, 3), np.uint8))  # [1, C]
    if probs.shape != (1, len(predictor.label_names)) or not np.isfinite(probs).all():
        raise RuntimeError(f"the model scores a blank image as {probs.tolist()}: not {len(predictor.label_names)} "
                           "finite numbers")


def _auth_token(env: str | None) -> bytes | None:
    """The bearer token's digest, from the environment variable named ``env`` (a Kubernetes Secret fills it)."""
    if not env:
        return None
    token = os.environ.get(env, "").strip()
    if not token:
        raise RuntimeError(f"Serve.auth_token_env={env}: the environment variable {env} is not set (or empty) on this "
                           "node; set it where the replicas run (a Kubernetes Secret), or leave auth_token_env unset")
    return hashlib.sha256(token.encode()).digest()


def _drawn(data: bytes, result: dict, max_pixels: int) -> str:
    """The image with its labels drawn below it, as predict saves it (``<name>_res.jpg``), in base64."""
    from mlcls_ray.infer.predict import result_image_jpeg  # matplotlib comes with it; only when an image is drawn

    return base64.b64encode(result_image_jpeg(data, result, max_pixels)).decode()


# ---- the app --------------------------------------------------------------------------------------------------------

app = FastAPI(title="mlcls-ray multi-label image classification", docs_url=None, redoc_url=None)


def _reply(status: int, message: str, result: dict | None = None, headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"logId": str(uuid.uuid4()), "errorCode": 0 if status == 200 else status,
                            "errorMsg": message}
    if result is not None:
        body["result"] = result
    return JSONResponse(body, status_code=status, headers=headers)


def _refusal(exc: RequestError) -> JSONResponse:
    return _reply(exc.status, exc.message, headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)


@app.exception_handler(HTTPException)
async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    return _reply(exc.status_code, str(exc.detail))  # 404 and 405 in the same schema


@app.exception_handler(Exception)
async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request failed")  # the traceback goes to the replica's log, not to the client
    return _reply(500, "Internal server error")


async def _read_json(request: Request, limit: int, why: str) -> dict:
    """The request body as a JSON object, read no further than ``limit`` bytes (``why`` says where that comes from):
    a declared length over it is refused before the body is read, a streamed one as soon as it passes it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "too_large", f"the request body ({int(declared):,} bytes) is over the limit of "
                                             f"{limit:,} ({why})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, "too_large", f"the request body is over the limit of {limit:,} bytes ({why})")
    try:
        data = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike; PaddleX answers 422 too
        raise RequestError(422, "not_json", f"the request body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RequestError(422, "wrong_type", f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def _b64decode(text: str, max_bytes: int) -> bytes:
    text = "".join(text.split())  # base64 wrapped at 76 columns is still base64
    if len(text) // 4 * 3 > max_bytes + 3:  # refuse before decoding
        raise RequestError(413, "too_large", f"image is over the limit of {max_bytes:,} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(422, "bad_base64", f"image is neither an http(s) URL nor valid base64 ({exc})") from None
    if len(data) > max_bytes:
        raise RequestError(413, "too_large", f"image is {len(data):,} bytes, over the limit of {max_bytes:,}")
    return data


@serve.deployment(name="MultiLabelClassifier")
@serve.ingress(app)
class MultiLabelClassifier:
    """One Predictor per replica; HTTP routes in PaddleX's schema, ``check_health`` for Serve, and ``stats()`` for a
    DeploymentHandle."""

    def __init__(self, settings: ServeSettings):
        self._token = _auth_token(settings.auth_token_env)
        # the CPUs Ray reserved for this replica, not the node's: replicas side by side must not oversubscribe it
        self._cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        if not settings.on_gpu:
            import torch

            torch.set_num_threads(max(1, int(self._cpus)))
        self.settings = settings
        self.predictor = Predictor(settings.model_dir, device=torch_device(settings.device, ray_assigned=True),
                                   max_pixels=settings.max_image_pixels)
        # one pool per kind of work, each bounded: a slow URL cannot hold a decode thread, nor decodes the model
        self._model = ThreadPoolExecutor(1, thread_name_prefix="mlcls-model")
        self._decodes = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="mlcls-decode")
        self._fetches = ThreadPoolExecutor(settings.fetch_threads, thread_name_prefix="mlcls-fetch")
        self._decode_threads_seen: set[str] = set()
        self._batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)
        self._images = 0
        self._errors: collections.Counter[str] = collections.Counter()
        self._batch_metric = metrics.Histogram("mlcls_serve_batch_size", "images per forward pass",
                                               boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self._image_metric = metrics.Counter("mlcls_serve_images", "images labeled")
        self._error_metric = metrics.Counter("mlcls_serve_errors", "requests or images refused, by kind",
                                             tag_keys=("kind",))

    def reconfigure(self, config: dict) -> None:
        self._score.set_max_batch_size(int(config.get("max_batch_size", self.settings.max_batch_size)))
        self._score.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s",
                                                              self.settings.batch_wait_timeout_s)))

    async def check_health(self) -> None:
        """Serve's periodic probe: a forward pass on one blank image, on the model's thread; raising replaces the
        replica."""
        await self._on(self._model, probe, self.predictor)

    def stats(self) -> dict:
        """Batch sizes seen (the latest 10,000), images labeled, errors by kind, the CPUs Ray gave the replica with
        its torch threads, and the names of the threads that have decoded, for tests and debugging."""
        import torch

        return {"batch_sizes": list(self._batch_sizes), "images": self._images, "errors": dict(self._errors),
                "cpus": self._cpus, "torch_threads": torch.get_num_threads(),
                "decode_threads": sorted(self._decode_threads_seen)}

    @staticmethod
    async def _on(pool: ThreadPoolExecutor, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def _decode(self, data: bytes) -> np.ndarray:
        self._decode_threads_seen.add(threading.current_thread().name)
        return self.predictor.decode(data)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # reset from the settings by reconfigure()
    async def _score(self, items: list) -> list[tuple[np.ndarray, ImageDecodeError | None]]:
        """Decoded squares (CPU) or file bytes (GPU) -> each image's ``[C]`` probabilities and decode error."""
        self._batch_sizes.append(len(items))
        self._batch_metric.observe(len(items))
        if self.settings.on_gpu:
            probs, errors = await self._on(self._model, self.predictor.score_encoded, items)
        else:
            probs = await self._on(self._model, self.predictor.probabilities, np.stack(items))
            errors = [None] * len(items)
        return list(zip(probs, errors))

    def _refused(self, exc: RequestError) -> None:
        self._errors[exc.kind] += 1
        self._error_metric.inc(tags={"kind": exc.kind})

    def _authorize(self, request: Request) -> None:
        """Bearer auth when ``auth_token_env`` is set, compared in constant time (digests of equal length)."""
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(),
                                                                 self._token):
            raise RequestError(401, "unauthorized", "a bearer token is required: send the header "
                                                    "'Authorization: Bearer <token>'")

    def _options(self, body: dict) -> tuple[np.ndarray, bool]:
        """A request's thresholds (top-level ``threshold``, or PaddleX's ``inferenceParams.threshold``) and whether
        to draw the labels on the image (``visualize``; ``Serve.visualize`` when absent or null)."""
        params = body.get("inferenceParams")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise RequestError(422, "wrong_type", f"inferenceParams must be an object, not {type(params).__name__}")
        given = [v for v in (body.get("threshold"), params.get("threshold")) if v is not None]
        if len(given) > 1:
            raise RequestError(422, "bad_threshold", "threshold is given twice: at the top level and in "
                                                     "inferenceParams; give one")
        try:
            thresholds = self.predictor.thresholds_for(thr.parse(given[0] if given else None))
        except thr.ThresholdError as exc:
            raise RequestError(422, "bad_threshold", str(exc)) from None
        visualize = body.get("visualize")
        if visualize is not None and not isinstance(visualize, bool):
            raise RequestError(422, "wrong_type", f"visualize must be true, false or null, not {visualize!r}")
        return thresholds, self.settings.visualize if visualize is None else visualize

    def _body_limit(self, images: int) -> tuple[int, str]:
        """The most bytes a request with up to ``images`` images may have, and which setting says so."""
        s = self.settings
        needed = images * (s.max_image_bytes * 4 // 3 + 8) + _JSON_SLACK
        if needed <= s.max_request_bytes:
            return needed, f"{images} image(s) of up to {s.max_image_bytes:,} bytes in base64"
        return s.max_request_bytes, "Serve.max_request_bytes"

    async def _image_bytes(self, image: Any) -> bytes:
        s = self.settings
        if not isinstance(image, str):
            raise RequestError(422, "wrong_type", f"image must be a string (base64 or an http(s) URL), not "
                                                  f"{type(image).__name__}")
        scheme = _SCHEME.match(image)
        if scheme is None:
            return _b64decode(image, s.max_image_bytes)
        if scheme.group(1).lower() not in ("http", "https"):
            raise RequestError(422, "bad_url", f"image URL scheme {scheme.group(1)!r}: only http and https")
        if not s.allow_urls:
            raise RequestError(403, "urls_disabled", "image URLs are disabled on this server (Serve.allow_urls="
                                                     "False); send the image as base64")
        return await self._on(self._fetches, fetch_url, image, s.max_image_bytes, s.url_timeout_s, s.url_ports,
                              s.url_allow_networks)

    async def _label(self, image: Any, thresholds: np.ndarray, visualize: bool) -> dict:
        """One image -> PaddleX's ``result``: ``categories`` over threshold, highest score first, and ``image``, the
        image with its labels drawn (base64 JPEG) when ``visualize``, else null."""
        data = await self._image_bytes(image)
        try:
            if self.settings.on_gpu:
                probs, error = await self._score(data)
                if error is not None:
                    raise error
            else:
                probs, _ = await self._score(await self._on(self._decodes, self._decode, data))
            res = self.predictor.labels(probs[None], thresholds)[0]
            drawn = (await self._on(self._decodes, _drawn, data, res, self.settings.max_image_pixels) if visualize
                     else None)  # on a GPU the CPU decoder first meets the file here
        except ImageDecodeError as exc:
            raise RequestError(422, exc.kind, f"image: {exc.reason}") from None
        self._images += 1
        self._image_metric.inc()
        return {"categories": [{"id": i, "name": n, "score": p}
                               for i, n, p in zip(res["class_ids"], res["label_names"], res["scores"])],
                "image": drawn}

    @app.post(ROUTE)
    async def classify(self, request: Request) -> JSONResponse:
        """PaddleX's endpoint: ``{"image": base64 | URL, "threshold"?, "inferenceParams"?: {"threshold"?},
        "visualize"?}`` -> ``{"result": {"categories": [...], "image": base64 JPEG | null}}``."""
        try:
            self._authorize(request)
            body = await _read_json(request, *self._body_limit(1))
            if "image" not in body:
                raise RequestError(422, "missing_field", 'the request body needs "image": base64 or an http(s) URL')
            result = await self._label(body["image"], *self._options(body))
        except RequestError as exc:
            self._refused(exc)
            return _refusal(exc)
        return _reply(200, "Success", result)

    @app.post(ROUTE + "/batch")
    async def classify_batch(self, request: Request) -> JSONResponse:
        """``{"images": [...], "threshold"?, "inferenceParams"?, "visualize"?}`` -> ``{"result": {"results": [...]}}``,
        one entry per image, in order; an image that fails has its own ``errorCode`` and ``errorMsg`` and the others
        are still labeled."""
        cap = self.settings.max_images_per_request
        try:
            self._authorize(request)
            body = await _read_json(request, *self._body_limit(cap))
            images = body.get("images")
            if not isinstance(images, list) or not images:
                raise RequestError(422, "missing_field" if images is None else "wrong_type",
                                   'the request body needs "images": a non-empty list of base64 or http(s) URLs')
            if len(images) > cap:
                raise RequestError(413, "too_many_images", f"{len(images)} images, over the limit of {cap} per "
                                                           "request (Serve.max_images_per_request)")
            options = self._options(body)
        except RequestError as exc:
            self._refused(exc)
            return _refusal(exc)

        async def one(image: Any) -> dict:
            try:
                return {"errorCode": 0, "errorMsg": "Success", **await self._label(image, *options)}
            except RequestError as exc:
                self._refused(exc)
                return {"errorCode": exc.status, "errorMsg": exc.message}

        return _reply(200, "Success", {"results": list(await asyncio.gather(*map(one, images)))})

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """Open without a token, for load balancers; the model itself is probed by :meth:`check_health`."""
        return _reply(200, "Healthy")


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application, for ``serve deploy`` / RayService (``import_path: mlcls_ray.infer.serve:build_app``).

    Args:
        args: :class:`ServeSettings` fields; ``model_dir`` is required. A ``deployments`` section in the Serve config
            overrides the options derived here.
    """
    return _application(ServeSettings.from_args(args))


def _application(settings: ServeSettings) -> Application:
    return MultiLabelClassifier.options(**deployment_options(settings)).bind(settings)


def run_serve(cfg: Config) -> int:
    """``Global.mode=serve``: run the endpoint in the foreground until Ctrl-C or SIGTERM, then shut Serve down."""
    settings = settings_from_config(cfg)
    model_folder.read_info(settings.model_dir)  # a wrong folder fails here in one line, not in 20 replica retries
    _auth_token(settings.auth_token_env)  # likewise a missing token (a local Ray's replicas get this environment)
    host, port = cfg["Serve.host"], cfg["Serve.port"]
    running = threading.Event()
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()
        if not running.is_set():
            raise KeyboardInterrupt  # still starting: break out of serve.run's wait

    # installed before anything starts: a signal during start-up must end in a clean shutdown too (Ray's own
    # SIGTERM handler in the driver aborts the process)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg["Serve.request_timeout_s"]})
        serve.run(_application(settings), name=APP_NAME, route_prefix="/")
        local = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        auth = f" -H \"Authorization: Bearer ${settings.auth_token_env}\"" if settings.auth_token_env else ""
        print(f"serving {settings.model_dir} on http://{host}:{port} ({settings.device}); Ctrl-C or SIGTERM stops\n"
              f"  curl -s {local}{ROUTE} -H 'Content-Type: application/json'{auth} \\\n"
              f"    -d \"{{\\\"image\\\": \\\"$(base64 -w0 image.jpg)\\\"}}\"", flush=True)
        running.set()
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping", flush=True)
        serve.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
