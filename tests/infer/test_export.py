"""Export round-trips: the graph alone (onnxruntime or torch.jit, without mlcls_ray) reproduces the Predictor."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from mlcls_ray import cli, model_dir, storage
from mlcls_ray.infer import export
from mlcls_ray.infer.export import EXPORT_RESULT, GRAPH_FILES, OPSET, export_model
from mlcls_ray.infer.predictor import Predictor

# Run in a fresh interpreter with only numpy and the runtime: preprocess as inference.yml says, score two batch sizes.
_STANDALONE = r"""
import json, sys
import numpy as np
fmt, graph, images, mean, std, out = sys.argv[1], sys.argv[2], sys.argv[3], *map(json.loads, sys.argv[4:6]), sys.argv[6]
squares = np.load(images)  # [B, S, S, 3] uint8, resized
x = ((squares.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)).transpose(0, 3, 1, 2)  # [B, 3, S, S]
x = np.ascontiguousarray(x, dtype=np.float32)
if fmt == "onnx":
    import onnxruntime as ort
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, outp.name) == ("x", "tensor(float)", "probs"), (inp, outp)
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == list(x.shape[1:]), inp.shape
    run = lambda batch: session.run(["probs"], {"x": batch})[0]
else:
    import torch
    net = torch.jit.load(graph)
    run = lambda batch: net(torch.from_numpy(batch)).detach().numpy()
assert not any(m.startswith("mlcls_ray") for m in sys.modules)
np.save(out, np.concatenate([run(x[:1]), run(x[1:])]))  # batch 1, then the rest: the batch axis is dynamic
"""


@pytest.fixture(scope="module")
def squares(tiny_model, tmp_path_factory) -> np.ndarray:
    """Four image files (JPEG and PNG, textured) through the Predictor's decoder and resize: ``[4, S, S, 3]``."""
    folder = tmp_path_factory.mktemp("images")
    predictor = Predictor(tiny_model)
    rng = np.random.default_rng(0)
    files = []
    for i, fmt in enumerate(["JPEG", "PNG", "JPEG", "PNG"]):
        img = np.zeros((40 + 8 * i, 56, 3), np.uint8) + np.uint8([60 * i, 200 - 40 * i, 90])
        img[: 10 + 5 * i, :20] = rng.integers(0, 256, (10 + 5 * i, 20, 3), dtype=np.uint8)  # a textured corner
        path = folder / f"{i}.{fmt.lower()}"
        Image.fromarray(img).save(path, fmt)
        files.append(path.read_bytes())
    return np.stack([predictor.decode(f) for f in files])


@pytest.fixture(scope="module")
def expected(tiny_model, squares) -> np.ndarray:
    """The Predictor's probabilities on ``squares``: ``[4, C]``."""
    probs = Predictor(tiny_model).probabilities(squares)
    assert np.ptp(probs, axis=0).max() > 1e-3  # the images score apart, so swapped rows or a missed std would show
    return probs


def _export_cli(model: str, output: str, fmt: str) -> int:
    return cli.main(["-c", "test_resnet_ML", "-o", "Global.mode=export", "-o", f"Export.weight_path={model}",
                     "-o", f"Global.output={output}", "-o", f"Export.format={fmt}"])


@pytest.fixture(scope="module", params=sorted(GRAPH_FILES))
def exported(request, tiny_model, tmp_path_factory) -> tuple[str, str, int]:
    """``(format, Global.output, exit code)`` of one ``Global.mode=export`` run per format."""
    output = str(tmp_path_factory.mktemp(f"export-{request.param}"))
    return request.param, output, _export_cli(tiny_model, output, request.param)


def test_cli_writes_an_inference_folder_that_is_a_model_folder(exported, tiny_model, squares, expected):
    fmt, output, rc = exported
    assert rc == 0
    inference = Path(output) / "inference"
    assert sorted(p.name for p in inference.iterdir()) == sorted([GRAPH_FILES[fmt], model_dir.WEIGHTS_FILE,
                                                                   model_dir.CONFIG_FILE])
    for name in (model_dir.WEIGHTS_FILE, model_dir.CONFIG_FILE):  # copied byte for byte
        assert (inference / name).read_bytes() == (Path(tiny_model) / name).read_bytes()
    result = json.loads((Path(output) / EXPORT_RESULT).read_text())
    assert result["done_flag"] is True and result["format"] == fmt
    assert result["files"][0] == f"inference/{GRAPH_FILES[fmt]}"
    assert result["input"] == {"name": "x", "dtype": "float32", "shape": [None, 3, 32, 32]}
    assert result["output"] == {"name": "probs", "dtype": "float32", "shape": [None, 4]}
    assert result["opset"] == (OPSET if fmt == "onnx" else None)
    assert result["checked"] is True  # onnxruntime is a test extra, so the ONNX graph was run at export too
    np.testing.assert_allclose(Predictor(str(inference)).probabilities(squares), expected, atol=1e-6)


def test_graph_alone_reproduces_the_predictor(exported, tiny_model, squares, expected, tmp_path):
    fmt, output, rc = exported
    assert rc == 0
    graph = Path(output) / "inference" / GRAPH_FILES[fmt]
    if fmt == "onnx":
        proto = onnx.load(str(graph))
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert {p.key: p.value for p in proto.metadata_props}[model_dir.CONFIG_FILE] == \
            (Path(tiny_model) / model_dir.CONFIG_FILE).read_text()
    spec = model_dir.read_info(tiny_model).spec
    np.save(tmp_path / "squares.npy", squares)
    subprocess.run([sys.executable, "-c", _STANDALONE, fmt, str(graph), str(tmp_path / "squares.npy"),
                    json.dumps(list(spec.mean)), json.dumps(list(spec.std)), str(tmp_path / "probs.npy")],
                   cwd=tmp_path, check=True, timeout=120)
    probs = np.load(tmp_path / "probs.npy")
    assert probs.shape == (len(squares), 4)
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)  # the issue asks 1e-4; fp32 gives ~1e-7


class _ExportOnlyBranch(export._WithSigmoid):
    """A network with an export-only branch, as some models have (``torch.onnx.is_in_onnx_export()``): its ONNX graph
    really computes something other than the network does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = super().forward(x)
        return probs + 1e-3 if torch.onnx.is_in_onnx_export() else probs


def test_an_onnx_graph_that_differs_from_the_network_fails_the_export(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "_WithSigmoid", _ExportOnlyBranch)
    assert _export_cli(tiny_model, str(tmp_path / "out"), "onnx") == 1  # onnxruntime ran the graph: 1e-3 apart
    message = capsys.readouterr().err.splitlines()[0]  # the CLI's one line (the next says how to see a traceback)
    assert re.fullmatch(rf"mlcls: export failed: .*{re.escape(tiny_model)}: the ONNX graph \(onnxruntime\) differs "
                        r"from the network by 0\.001 at batch 1 \(more than 0\.0001\); .*Export\.format=torchscript",
                        message), message
    assert json.loads((tmp_path / "out" / EXPORT_RESULT).read_text())["done_flag"] is False
    assert not (tmp_path / "out" / "inference").exists()
    # without onnxruntime the same graph cannot be run: the export goes through and says it was not checked
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` then raises ImportError
    assert _export_cli(tiny_model, str(tmp_path / "out"), "onnx") == 0
    assert json.loads((tmp_path / "out" / EXPORT_RESULT).read_text())["checked"] is False
    assert "onnxruntime is not installed" in capsys.readouterr().out


def test_the_opset_is_stated_once():
    """Every "opset N" in the README, the presets and the exporter's docstring is the one the exporter uses."""
    root = Path(__file__).resolve().parents[2]
    texts = [root / "README.md", Path(export.__file__), *sorted((root / "mlcls_ray" / "configs").glob("*.yaml"))]
    stated = {(p.name, int(n)) for p in texts for n in re.findall(r"opset (\d+)", p.read_text(), re.I)}
    assert stated and {n for _, n in stated} == {OPSET}, stated


def test_missing_model_folder_is_one_line_and_exit_1(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert _export_cli(str(missing), str(tmp_path / "out"), "onnx") == 1
    message = capsys.readouterr().err.splitlines()[0]
    assert message.startswith("mlcls: export failed: ") and str(missing) in message
    record = json.loads((tmp_path / "out" / EXPORT_RESULT).read_text())
    assert record["done_flag"] is False and str(missing) in record["err_msg"]
    assert not (tmp_path / "out" / "inference").exists()


def test_corrupt_weights_leave_the_failure_record(tiny_model, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / model_dir.CONFIG_FILE).write_bytes((Path(tiny_model) / model_dir.CONFIG_FILE).read_bytes())
    (broken / model_dir.WEIGHTS_FILE).write_bytes(b"not safetensors")
    assert _export_cli(str(broken), str(tmp_path / "out"), "torchscript") == 1
    assert model_dir.WEIGHTS_FILE in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / EXPORT_RESULT).read_text())["done_flag"] is False


def test_unknown_format_is_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="'tflite' is not one of onnx, torchscript"):
        export_model(tiny_model, str(tmp_path), "tflite")
    assert _export_cli(tiny_model, str(tmp_path / "out"), "tflite") == 2  # the config's choices refuse it first


def test_export_to_s3(tiny_model, s3_bucket, squares, expected):
    output = f"{s3_bucket}/run"
    assert _export_cli(tiny_model, output, "torchscript") == 0
    inference = storage.join(output, "inference")
    assert storage.read_bytes(storage.join(inference, model_dir.WEIGHTS_FILE)) == \
        (Path(tiny_model) / model_dir.WEIGHTS_FILE).read_bytes()
    assert storage.exists(storage.join(inference, GRAPH_FILES["torchscript"]))
    result = json.loads(storage.read_text(storage.join(output, EXPORT_RESULT)))
    assert result["done_flag"] is True and result["files"][0] == "inference/inference.pt"
    np.testing.assert_allclose(Predictor(inference).probabilities(squares), expected, atol=1e-6)
