"""The HTTP labeling endpoint: Ray Serve with a FastAPI ingress, dynamic batching, PaddleX's serving schema.

``Global.mode=serve`` runs it in the foreground (:func:`run_serve`); ``serve deploy cluster/serve.yaml`` and KubeRay's
RayService build it from ``import_path: mlcls_ray.infer.serve:build_app`` (:func:`build_app`). Both go through
:func:`deployment_options`, the one place that maps settings to replicas, batching and autoscaling.

Each request's image is decoded and resized in a thread (on CPU) and joins a ``@serve.batch`` of up to
``max_batch_size`` images for one forward pass; on a GPU the file's bytes join the batch and JPEGs are decoded on the
device (:meth:`Predictor.score_encoded`). Bad input is answered with a 4xx whose ``errorCode`` is the HTTP status (as
PaddleX does) and whose ``errorMsg`` says what was wrong; it never reaches the model and never restarts a replica.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at runtime, and through
# Serve's ingress wrapper it cannot resolve them from strings
import asyncio
import base64
import binascii
import collections
import dataclasses
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import threading
import time
import urllib.parse
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics
from ray.serve.deployment import Application
from starlette.exceptions import HTTPException

from mlcls_ray import model_dir as model_folder
from mlcls_ray import storage
from mlcls_ray.config import Config
from mlcls_ray.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError
from mlcls_ray.infer import thresholds as thr
from mlcls_ray.infer.predictor import Predictor

__all__ = ["APP_NAME", "ROUTE", "RequestError", "ServeSettings", "build_app", "check_address", "deployment_options",
           "fetch_url", "run_serve", "settings_from_config"]

APP_NAME = "mlcls"
ROUTE = "/multilabel-image-classification"
_JSON_SLACK = 64 << 10  # room for the threshold and the JSON around the base64 image(s)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Everything the app takes; ``build_app``'s args use these names. Defaults are the presets' ``Serve`` section
    (a test keeps them equal)."""

    model_dir: str
    device: str = "cpu"  # cpu | gpu | gpu:0,1 as Global.device; on a GPU each replica takes one
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.05
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    max_image_bytes: int = 20 << 20
    max_images_per_request: int = 64
    allow_urls: bool = False
    url_timeout_s: float = 5.0

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("gpu")

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeSettings":
        """Settings from a builder's args (typed YAML, or strings from ``serve run ... key=value``).

        Raises:
            ValueError: an unknown key, a missing ``model_dir``, or a value of the wrong type; every problem at once.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems = [f"unknown arg {k!r}; the args are {', '.join(fields)}" for k in args if k not in fields]
        if not args.get("model_dir"):
            problems.append("model_dir is required: the model folder to serve (local or s3://)")
        values = {}
        for name, value in args.items():
            if name not in fields or name == "model_dir":
                continue
            try:
                values[name] = _coerce(value, type(fields[name].default))
            except ValueError:
                problems.append(f"{name}={value!r} is not a {type(fields[name].default).__name__}")
        if "device" in values and not re.fullmatch(r"cpu|gpu(:\d+(,\d+)*)?", values["device"]):
            problems.append(f"device={values['device']!r}: use cpu, gpu or gpu:0,1")
        if problems:
            raise ValueError("mlcls_ray.infer.serve:build_app: " + "; ".join(problems))
        return cls(model_dir=storage.absolute(args["model_dir"]), **values)


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise ValueError(value)
        return value
    if isinstance(value, bool):  # bool is an int; True is no batch size
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return kind(value)


def settings_from_config(cfg: Config) -> ServeSettings:
    """The ``Serve`` section (plus ``Global.device``, ``Global.max_image_pixels``) as :class:`ServeSettings`."""
    model = cfg["Serve.model_dir"] or storage.join(cfg["Global.output"], "best_model")
    keys = ("max_batch_size", "batch_wait_timeout_s", "min_replicas", "max_replicas", "target_ongoing_requests",
            "max_image_bytes", "max_images_per_request", "allow_urls", "url_timeout_s")
    return ServeSettings(model_dir=storage.absolute(model), device=cfg["Global.device"],
                         max_image_pixels=cfg["Global.max_image_pixels"], **{k: cfg[f"Serve.{k}"] for k in keys})


def deployment_options(s: ServeSettings) -> dict[str, Any]:
    """Replica resources, concurrency, autoscaling and batching for ``Deployment.options``: the one mapping."""
    return {
        # Serve's default of 5 ongoing requests would cap every batch at 5; leave room for two full batches
        "max_ongoing_requests": max(2 * s.max_batch_size, math.ceil(s.target_ongoing_requests)),
        "autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                               "target_ongoing_requests": s.target_ongoing_requests},
        # on CPU a small reservation, so a replica fits beside other work on a small node; threads are set apart
        "ray_actor_options": {"num_gpus": 1, "num_cpus": 1} if s.on_gpu else {"num_cpus": 0.5},
        # applied by reconfigure(), so `serve deploy` can retune batching without reloading the model
        "user_config": {"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
    }


class RequestError(Exception):
    """Bad input: answered with ``status`` (also the ``errorCode``), counted under ``kind``."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


# ---- URLs: off by default; when on, public addresses only, the connection pinned to the address checked ----------

def check_address(ip: str) -> None:
    """Refuse an address a server should not be made to fetch from (SSRF).

    Raises:
        RequestError: the address is private, loopback, link-local, reserved, multicast or unspecified.
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    if (not addr.is_global or addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved
            or addr.is_multicast or addr.is_unspecified):
        raise RequestError(403, "url_refused", f"image URL resolves to {addr}, which is not a public address")


def fetch_url(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """GET an http(s) URL's bytes; no redirects, at most ``max_bytes``, ``timeout_s`` in all.

    Raises:
        RequestError: the URL is malformed, resolves to a non-public address, redirects, fails, or is too large.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError(422, "bad_url", f"image URL {url!r}: only http:// and https:// URLs with a host are taken")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        raise RequestError(422, "url_failed", f"image URL {url!r}: cannot resolve the host ({exc})") from None
    for info in infos:  # every address the name has, so a second lookup cannot pick an unchecked one
        check_address(info[4][0])
    return _download(parts, infos[0][4][0], port, max_bytes, timeout_s)


def _download(parts: urllib.parse.SplitResult, ip: str, port: int, max_bytes: int, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, port, timeout=timeout_s)
    # connect to the address that was checked (no DNS rebinding); TLS still verifies the certificate of the name
    conn._create_connection = lambda _addr, timeout, source: socket.create_connection((ip, port), timeout, source)
    url = parts.geturl()
    try:
        conn.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")))
        resp = conn.getresponse()
        if 300 <= resp.status < 400:
            raise RequestError(422, "url_failed", f"image URL {url!r} redirects (HTTP {resp.status}); redirects are "
                                                  "not followed, give the final URL")
        if resp.status != 200:
            raise RequestError(422, "url_failed", f"image URL {url!r} answered HTTP {resp.status}")
        data = bytearray()
        while chunk := resp.read(min(1 << 16, max_bytes + 1 - len(data))):
            data += chunk
            if len(data) > max_bytes:
                raise RequestError(413, "too_large", f"image URL {url!r} is over the limit of {max_bytes:,} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not done after {timeout_s} s")
        return bytes(data)
    except (OSError, http.client.HTTPException) as exc:
        raise RequestError(422, "url_failed", f"image URL {url!r}: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


# ---- the app --------------------------------------------------------------------------------------------------------

app = FastAPI(title="mlcls-ray multi-label image classification", docs_url=None, redoc_url=None)


def _reply(status: int, message: str, result: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"logId": str(uuid.uuid4()), "errorCode": 0 if status == 200 else status,
                            "errorMsg": message}
    if result is not None:
        body["result"] = result
    return JSONResponse(body, status_code=status)


@app.exception_handler(HTTPException)
async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    return _reply(exc.status_code, str(exc.detail))  # 404 and 405 in the same schema


@app.exception_handler(Exception)
async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request failed")  # the traceback goes to the replica's log, not to the client
    return _reply(500, "Internal server error")


async def _read_json(request: Request, limit: int, why: str) -> dict:
    """The request body as a JSON object, read no further than ``limit`` bytes (``why`` says where that comes from)."""
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
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise RequestError(400, "not_json", f"the request body is not JSON ({exc})") from None
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
    """One Predictor per replica; HTTP routes in PaddleX's schema, and ``stats()`` for a DeploymentHandle."""

    def __init__(self, settings: ServeSettings):
        if not settings.on_gpu:
            # the reservation is small (0.5 CPU) so that replicas fit; their forward passes share half the node's cores
            # and leave the rest to the HTTP proxy and the decode threads (more threads on 2 cores ran slower)
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // (2 * settings.max_replicas)))
        self.settings = settings
        self.predictor = Predictor(settings.model_dir, device="cuda" if settings.on_gpu else "cpu",
                                   max_pixels=settings.max_image_pixels)
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

    def stats(self) -> dict:
        """Batch sizes seen (the latest 10,000), images labeled and errors by kind, for tests and debugging."""
        return {"batch_sizes": list(self._batch_sizes), "images": self._images, "errors": dict(self._errors)}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # reset from the settings by reconfigure()
    async def _score(self, items: list) -> list[tuple[np.ndarray, ImageDecodeError | None]]:
        """Decoded squares (CPU) or file bytes (GPU) -> each image's ``[C]`` probabilities and decode error."""
        self._batch_sizes.append(len(items))
        self._batch_metric.observe(len(items))
        if self.settings.on_gpu:
            probs, errors = await asyncio.to_thread(self.predictor.score_encoded, items)
        else:
            probs, errors = await asyncio.to_thread(self.predictor.probabilities, np.stack(items)), [None] * len(items)
        return list(zip(probs, errors))

    def _refused(self, exc: RequestError) -> None:
        self._errors[exc.kind] += 1
        self._error_metric.inc(tags={"kind": exc.kind})

    def _thresholds(self, body: dict) -> np.ndarray:
        try:
            return self.predictor.thresholds_for(thr.parse(body.get("threshold")))
        except thr.ThresholdError as exc:
            raise RequestError(422, "bad_threshold", str(exc)) from None

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
        return await asyncio.to_thread(fetch_url, image, s.max_image_bytes, s.url_timeout_s)

    async def _label(self, image: Any, thresholds: np.ndarray) -> dict:
        """One image -> PaddleX's ``result``: ``categories`` over threshold, highest score first."""
        data = await self._image_bytes(image)
        try:
            if self.settings.on_gpu:
                probs, error = await self._score(data)
                if error is not None:
                    raise error
            else:
                probs, _ = await self._score(await asyncio.to_thread(self.predictor.decode, data))
        except ImageDecodeError as exc:
            raise RequestError(422, exc.kind, f"image: {exc.reason}") from None
        self._images += 1
        self._image_metric.inc()
        res = self.predictor.labels(probs[None], thresholds)[0]
        return {"categories": [{"id": i, "name": n, "score": p}
                               for i, n, p in zip(res["class_ids"], res["label_names"], res["scores"])], "image": None}

    @app.post(ROUTE)
    async def classify(self, request: Request) -> JSONResponse:
        """PaddleX's endpoint: ``{"image": base64 | URL, "threshold"?}`` -> ``{"result": {"categories": [...]}}``."""
        try:
            body = await _read_json(request, self.settings.max_image_bytes * 4 // 3 + _JSON_SLACK,
                                    f"an image of up to {self.settings.max_image_bytes:,} bytes in base64")
            if "image" not in body:
                raise RequestError(422, "missing_field", 'the request body needs "image": base64 or an http(s) URL')
            result = await self._label(body["image"], self._thresholds(body))
        except RequestError as exc:
            self._refused(exc)
            return _reply(exc.status, exc.message)
        return _reply(200, "Success", result)

    @app.post(ROUTE + "/batch")
    async def classify_batch(self, request: Request) -> JSONResponse:
        """``{"images": [...], "threshold"?}`` -> ``{"result": {"results": [...]}}``, one entry per image, in order;
        an image that fails has its own ``errorCode`` and ``errorMsg`` and the others are still labeled."""
        cap = self.settings.max_images_per_request
        try:
            body = await _read_json(request, cap * (self.settings.max_image_bytes * 4 // 3 + 8) + _JSON_SLACK,
                                    f"{cap} images of up to {self.settings.max_image_bytes:,} bytes in base64")
            images = body.get("images")
            if not isinstance(images, list) or not images:
                raise RequestError(422, "missing_field" if images is None else "wrong_type",
                                   'the request body needs "images": a non-empty list of base64 or http(s) URLs')
            if len(images) > cap:
                raise RequestError(413, "too_many_images", f"{len(images)} images, over the limit of {cap} per "
                                                           "request (Serve.max_images_per_request)")
            thresholds = self._thresholds(body)
        except RequestError as exc:
            self._refused(exc)
            return _reply(exc.status, exc.message)

        async def one(image: Any) -> dict:
            try:
                return {"errorCode": 0, "errorMsg": "Success", **await self._label(image, thresholds)}
            except RequestError as exc:
                self._refused(exc)
                return {"errorCode": exc.status, "errorMsg": exc.message}

        return _reply(200, "Success", {"results": list(await asyncio.gather(*map(one, images)))})

    @app.get("/health")
    async def health(self) -> JSONResponse:
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
        serve.start(http_options={"host": host, "port": port})
        serve.run(_application(settings), name=APP_NAME, route_prefix="/")
        local = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        print(f"serving {settings.model_dir} on http://{host}:{port} ({settings.device}); Ctrl-C or SIGTERM stops\n"
              f"  curl -s {local}{ROUTE} -H 'Content-Type: application/json' \\\n"
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
