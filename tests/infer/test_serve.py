"""The Serve endpoint through real HTTP on 127.0.0.1: PaddleX's schema, thresholds, the drawn image, the batch
endpoint, the bearer token, every kind of bad input and the limits, the URL policy, batching under concurrent clients,
the health probe, the Serve config file and the CLI's serve mode. (The URL fetcher itself: test_fetch.py.)"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import yaml

from mlcls_ray.config import load_config
from mlcls_ray.data.images import decode_image
from mlcls_ray.data.report import demo_image_jpeg
from mlcls_ray.infer import serve as srv
from mlcls_ray.infer import serve_settings as sets
from mlcls_ray.infer.predictor import Predictor
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
# small limits to test them with small files; URLs on, to test what is refused, and a token (the CLI test sees the
# defaults: URLs off, no token)
LIMITS = {"max_batch_size": 8, "batch_wait_timeout_s": 0.05, "max_image_bytes": 200_000, "max_image_pixels": 100_000,
          "max_images_per_request": 8, "max_request_bytes": 600_000, "decode_threads": 2, "cpus_per_replica": 1,
          "allow_urls": True, "url_timeout_s": 1.0, "auth_token_env": "MLCLS_TEST_TOKEN"}
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}



def _encode(img, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _jpeg(seed: int = 0, size: tuple[int, int] = (40, 32)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return _encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def served(ray_start_2_cpus, tiny_model):
    """The app on a free port with LIMITS, on the session's Ray; its replica's environment holds the token, as a
    Kubernetes Secret would put it in the pod's."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = sets.ServeSettings.from_args({"model_dir": tiny_model, **LIMITS})
    options = sets.deployment_options(settings)
    options["ray_actor_options"]["runtime_env"] = {"env_vars": {LIMITS["auth_token_env"]: TOKEN}}
    app = srv.MultiLabelClassifier.options(**options).bind(settings)
    handle = serve.run(app, name="mlcls", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(base=base, url=base + srv.ROUTE, handle=handle, predictor=Predictor(tiny_model))
    serve.shutdown()


def _post(url: str, **body) -> requests.Response:
    return requests.post(url, json=body, headers=AUTH, timeout=30)


def _ids(resp: requests.Response) -> list[int]:
    return [c["id"] for c in resp.json()["result"]["categories"]]


def test_paddlex_schema_and_scores_equal_the_predictor(served):
    data = _jpeg(1)
    resp = _post(served.url, image=_b64(data), threshold=0.0)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"logId", "errorCode", "errorMsg", "result"}
    assert (body["errorCode"], body["errorMsg"], body["result"]["image"]) == (0, "Success", None)
    assert len(body["logId"]) == 36
    cats = body["result"]["categories"]
    expected = served.predictor.probabilities(served.predictor.decode(data)[None])[0]  # [C]
    assert sorted(c["id"] for c in cats) == [0, 1, 2, 3]
    assert [c["score"] for c in cats] == sorted((c["score"] for c in cats), reverse=True)
    for c in cats:
        assert c["name"] == served.predictor.label_names[c["id"]]
        assert c["score"] == pytest.approx(float(expected[c["id"]]), abs=1e-5)
    # without a threshold the folder's calibrated ones apply
    default = served.predictor.labels(expected[None])[0]["class_ids"]
    assert _ids(_post(served.url, image=_b64(data))) == default


@pytest.mark.parametrize("threshold, expected", [
    (1.0, []),
    ([0.0, 1.0, 1.0, 1.0], [0]),
    ({"default": 1.0, "top_right": 0.0}, [1]),
    ({"default": 1.0, "2": 0.0}, [2]),
    ("0.0", [0, 1, 2, 3]),
])
def test_threshold_override(served, threshold, expected):
    resp = _post(served.url, image=_b64(_jpeg(2)), threshold=threshold)
    assert resp.status_code == 200, resp.text
    assert sorted(_ids(resp)) == expected


def test_batch_endpoint_labels_each_image_and_reports_each_failure(served):
    good = _b64(_jpeg(3))
    resp = _post(served.url + "/batch", images=[good, _b64(b"not an image at all"), good], threshold=0.0)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["errorCode"], body["errorMsg"]) == (0, "Success")
    first, bad, last = body["result"]["results"]
    single = _post(served.url, image=good, threshold=0.0).json()["result"]
    assert first["errorCode"] == last["errorCode"] == 0
    assert first["categories"] == last["categories"] == single["categories"]
    assert bad == {"errorCode": 422, "errorMsg": bad["errorMsg"]} and "not an image" in bad["errorMsg"]


@pytest.mark.parametrize("body, status, words", [
    ({"images": [_b64(b"x")] * 9}, 413, "over the limit of 8"),
    ({}, 422, '"images"'),
    ({"images": "abc"}, 422, "non-empty list"),
    ({"images": [_b64(b"x")], "threshold": [0.5]}, 422, "threshold"),
])
def test_batch_endpoint_refuses_bad_requests(served, body, status, words):
    resp = _post(served.url + "/batch", **body)
    assert resp.status_code == status and resp.json()["errorCode"] == status
    assert words in resp.json()["errorMsg"]


def _png_of_pixels(width: int, height: int) -> bytes:
    from PIL import Image

    return _encode(Image.new("L", (width, height)), "PNG")  # zeros compress to almost nothing: a bomb's shape


BAD = {
    "not_json": (b"{not json", 422, "not JSON"),  # 422 as PaddleX
    "not_an_object": (b"[1, 2]", 422, "JSON object"),
    "missing_image": ({"threshold": 0.5}, 422, '"image"'),
    "image_not_a_string": ({"image": 5}, 422, "must be a string"),
    "bad_base64": ({"image": "!!!not base64!!!"}, 422, "base64"),
    "empty_image": ({"image": ""}, 422, "empty"),
    "not_an_image": ({"image": _b64(b"hello, these bytes are text")}, 422, "not an image"),
    "truncated_jpeg": ({"image": _b64(_jpeg(4)[:300])}, 422, "corrupt"),
    "over_byte_limit": ({"image": _b64(os.urandom(300_000))}, 413, "200,000"),  # refused while reading the body
    "over_byte_limit_in_base64": ({"image": _b64(os.urandom(210_000))}, 413, "200,000"),
    "over_pixel_limit": ({"image": _b64(_png_of_pixels(400, 300))}, 422, "100,000"),
    "decompression_bomb": ({"image": _b64(_png_of_pixels(6000, 6000))}, 422, "decompression bomb"),
    "threshold_list_length": ({"image": _b64(_jpeg(5)), "threshold": [0.5, 0.5]}, 422, "threshold"),
    "threshold_dict_without_default": ({"image": _b64(_jpeg(5)), "threshold": {"1": 0.5}}, 422, "default"),
    "threshold_unknown_class": ({"image": _b64(_jpeg(5)), "threshold": {"default": 0.5, "cat": 0.1}}, 422, "cat"),
    "threshold_out_of_range": ({"image": _b64(_jpeg(5)), "threshold": 1.5}, 422, "[0, 1]"),
    "threshold_wrong_type": ({"image": _b64(_jpeg(5)), "threshold": True}, 422, "threshold true"),
    "threshold_twice": ({"image": _b64(_jpeg(5)), "threshold": 0.5, "inferenceParams": {"threshold": 0.4}}, 422,
                        "given twice"),
    "inference_params_not_an_object": ({"image": _b64(_jpeg(5)), "inferenceParams": [0.5]}, 422, "must be an object"),
    "visualize_not_a_bool": ({"image": _b64(_jpeg(5)), "visualize": "yes"}, 422, "visualize must be"),
    "other_scheme": ({"image": "file:///etc/passwd"}, 422, "only http and https"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_4xx_that_says_why_and_the_replica_stays_healthy(served, case):
    body, status, words = BAD[case]
    if isinstance(body, bytes):
        resp = requests.post(served.url, data=body, headers={"Content-Type": "application/json", **AUTH}, timeout=30)
    else:
        resp = _post(served.url, **body)
    assert resp.status_code == status, resp.text
    answer = resp.json()
    assert answer["errorCode"] == status and "result" not in answer
    assert words.lower() in answer["errorMsg"].lower()
    assert "Traceback" not in resp.text
    assert _post(served.url, image=_b64(_jpeg(6))).status_code == 200


def test_unknown_route_answers_in_the_same_schema(served):
    resp = requests.get(served.base + "/nope", timeout=30)
    assert resp.status_code == 404 and resp.json()["errorCode"] == 404


def test_health(served):
    resp = requests.get(served.base + "/health", timeout=30)
    assert resp.status_code == 200
    assert {k: v for k, v in resp.json().items() if k != "logId"} == {"errorCode": 0, "errorMsg": "Healthy"}


def test_a_bearer_token_is_required_except_for_health(served):
    image = _b64(_jpeg(1))
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        for url, body in ((served.url, {"image": image}), (served.url + "/batch", {"images": [image]})):
            resp = requests.post(url, json=body, headers=headers, timeout=30)
            assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer", resp.text
            answer = resp.json()
            assert answer["errorCode"] == 401 and "bearer token" in answer["errorMsg"] and "result" not in answer
    assert requests.get(served.base + "/health", timeout=30).status_code == 200  # load balancers probe without it
    assert _post(served.url, image=image).status_code == 200


def test_visualize_returns_the_image_with_its_labels_drawn_as_predict_does(served):
    data = _jpeg(9, (64, 48))
    result = _post(served.url, image=_b64(data), threshold=0.0, visualize=True).json()["result"]
    shown = [f"{c['name']} ({c['score']:.2f})" for c in result["categories"]]
    drawn = demo_image_jpeg(decode_image(data), shown)
    assert base64.b64decode(result["image"]) == drawn  # what PaddleX's sample client decodes
    assert _post(served.url, image=_b64(data), visualize=False).json()["result"]["image"] is None  # the default
    results = _post(served.url + "/batch", images=[_b64(data), _b64(b"junk")], threshold=0.0,
                    visualize=True).json()["result"]["results"]
    assert base64.b64decode(results[0]["image"]) == drawn and "image" not in results[1]


def test_paddlex_inference_params_threshold(served):
    image = _b64(_jpeg(2))
    assert _ids(_post(served.url, image=image, inferenceParams={"threshold": 1.0})) == []
    assert sorted(_ids(_post(served.url, image=image, inferenceParams={"threshold": {"default": 1.0, "2": 0.0}}))) \
        == [2]


def test_a_body_over_max_request_bytes_is_refused_before_it_is_read(served):
    # 1.5 MB declared: within what 8 images of 200 kB need, over Serve.max_request_bytes; only the first bytes are sent
    head = (f"POST {srv.ROUTE}/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1500000\r\n\r\n")
    port = int(served.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + b'{"images": ["' + b"A" * 1000)
        answer = b""
        while b"}" not in answer.partition(b"\r\n\r\n")[2]:  # the JSON answer, whole; a timeout fails the test
            answer += sock.recv(65536)
    answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "Serve.max_request_bytes" in answer and "600,000" in answer
    resp = _post(served.url + "/batch", images=[_b64(os.urandom(150_000))] * 4)  # 800 kB of JSON, sent whole
    assert resp.status_code == 413 and "Serve.max_request_bytes" in resp.json()["errorMsg"]


def test_health_check_runs_a_forward_pass(served, tiny_model):
    served.handle.check_health.remote().result()  # Serve calls it every 10 s; raising replaces the replica
    predictor = Predictor(tiny_model)
    srv.probe(predictor)
    for p in predictor.model.parameters():  # weights gone bad in memory: the probe, not /health, notices
        p.data.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="not 4 finite numbers"):
        srv.probe(predictor)


@pytest.mark.parametrize("url", ["http://127.0.0.1/x.jpg", "http://localhost/x.jpg", "http://10.0.0.7/x.jpg",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]/x.jpg",
                                 "http://[2002:a9fe:a9fe::]/latest/meta-data"])
def test_urls_to_non_public_addresses_are_refused_when_enabled(served, url):
    resp = _post(served.url, image=url)
    assert resp.status_code == 403, resp.text
    assert resp.json()["errorCode"] == 403 and "not a public address" in resp.json()["errorMsg"]


def test_concurrent_clients_are_batched(served):
    seen = len(served.handle.stats.remote().result()["batch_sizes"])
    images = [_b64(_jpeg(i)) for i in range(8)]

    def client(i: int) -> list[int]:
        return [_post(served.url, image=images[(i + k) % 8]).status_code for k in range(4)]

    with ThreadPoolExecutor(16) as pool:
        codes = [c for codes in pool.map(client, range(16)) for c in codes]
    assert codes == [200] * 64
    stats = served.handle.stats.remote().result()
    sizes = stats["batch_sizes"][seen:]
    assert sum(sizes) == 64
    assert max(sizes) > 1 and max(sizes) <= LIMITS["max_batch_size"], sizes
    # 64 requests at once decoded on the replica's own bounded pool; torch on the CPUs Ray gave it, not the node's
    decoders = stats["decode_threads"]
    assert 1 <= len(decoders) <= LIMITS["decode_threads"] and all(n.startswith("mlcls-decode") for n in decoders), stats
    assert stats["cpus"] == LIMITS["cpus_per_replica"] and stats["torch_threads"] == LIMITS["cpus_per_replica"]


def test_settings_defaults_are_the_presets():
    cfg = load_config("ResNet50_ML", check_paths=False)
    s = sets.settings_from_config(cfg)
    defaults = sets.ServeSettings(model_dir=s.model_dir, device=s.device)
    assert s == defaults
    # Serve's own limits, not the dataset modes': a 100 KB PNG may not become 270 MB of pixels, 64 times a request
    assert s.max_image_pixels == 25_000_000 < cfg["Global.max_image_pixels"]
    assert s.max_request_bytes == 32 << 20 and s.url_ports == (80, 443) and s.auth_token_env is None


def test_build_app_args_are_checked():
    with pytest.raises(ValueError) as exc:
        srv.build_app({"max_batch_size": "many", "batchsize": 4, "allow_urls": "yes", "device": "tpu",
                       "url_ports": "http"})
    for words in ("model_dir is required", "'batchsize'", "max_batch_size='many'", "allow_urls='yes'", "device='tpu'",
                  "'http' is not a TCP port"):
        assert words in str(exc.value)
    opts = sets.deployment_options(sets.ServeSettings.from_args({"model_dir": "m", "max_batch_size": "32",
                                                                "allow_urls": "true", "device": "gpu"}))
    assert opts["max_ongoing_requests"] == 64 and opts["ray_actor_options"]["num_gpus"] == 1


def test_serve_config_file_validates_and_its_import_path_builds():
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.parse_obj(yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "mlcls_ray.infer.serve:build_app"
    assert call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args) is not None
    (deployment,) = app.deployments
    assert deployment.name == "MultiLabelClassifier" and deployment.ray_actor_options.num_gpus == 1


def test_cli_serve_mode_runs_until_sigterm(tiny_model, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlcls_ray.cli", "-c", "test_resnet_ML", "-o", "Global.mode=serve",
                             "-o", f"Serve.model_dir={tiny_model}", "-o", f"Serve.port={port}", "-o",
                             "Global.device=cpu", "-o", f"Global.output={tmp_path / 'out'}"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:  # up once it says so: /health may answer while serve.run still waits for the app
                if ("SIGTERM stops" in (tmp_path / "serve.log").read_text()
                        and requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200):
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}{srv.ROUTE}"
        assert _post(url, image=_b64(_jpeg(8))).json()["errorCode"] == 0
        refused = _post(url, image="https://example.com/cat.jpg")  # Serve.allow_urls is off by default
        assert refused.status_code == 403 and "URLs are disabled" in refused.json()["errorMsg"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "curl" in (tmp_path / "serve.log").read_text()
