"""``Global.mode=export``: a model folder -> an inference folder with a graph that runs without this package.

The inference folder (``<Global.output>/inference/``, local or ``s3://``) holds the model folder's
``model.safetensors`` and ``inference.yml`` byte for byte, so it is itself a model folder for the Predictor, plus one
graph: ``inference.onnx`` (torch's ``torch.export``-based exporter, opset 18) or ``inference.pt`` (TorchScript).
Either takes ``x``, float32 ``[N, 3, S, S]`` images resized, scaled by 1/255 and normalised as ``inference.yml``
says, and returns ``probs``, float32 ``[N, C]`` sigmoid scores (PaddleX's export appends the Sigmoid too); the
batch axis is dynamic. The graph also embeds ``inference.yml`` (ONNX metadata, a TorchScript extra file).
Before anything is written, the graph is run at batch 1 and 3 (it is traced at 2) against the network, and a
difference beyond 1e-4 fails the export: TorchScript always, ONNX with onnxruntime when it is installed.
``export_result.json`` records what was written, or ``{"done_flag": false, ...}`` when the export failed.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import torch
from torch import nn

from mlcls_ray import model_dir, results, storage
from mlcls_ray.config import Config
from mlcls_ray.models.zoo import MLClassifier

__all__ = ["EXPORT_RESULT", "GRAPH_FILES", "INFERENCE_DIR", "INPUT_NAME", "OPSET", "OUTPUT_NAME", "ExportError",
           "export_model", "run_export"]

EXPORT_RESULT = "export_result.json"
INFERENCE_DIR = "inference"
GRAPH_FILES = {"onnx": "inference.onnx", "torchscript": "inference.pt"}  # Export.format -> the graph's file
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "x", "probs"
_EXAMPLE_BATCH = 2  # an example batch of 1 lets the exporters treat the batch axis as the constant 1
_TOLERANCE = 1e-4  # max |graph - eager| on the check batch


class ExportError(RuntimeError):
    """The network could not be turned into a graph, or the graph does not reproduce the network."""


class _WithSigmoid(nn.Module):
    """The exported network: normalised images ``[N, 3, S, S]`` -> probabilities ``[N, C]``."""

    def __init__(self, model: MLClassifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


def _check(graph: str, run: Callable[[torch.Tensor], torch.Tensor], net: nn.Module, example: torch.Tensor,
           hint: str) -> None:
    """Raise ExportError when ``run`` (the graph) and ``net`` differ by more than the tolerance at batch 1 or 3."""
    with torch.no_grad():
        for batch in (1, _EXAMPLE_BATCH + 1):
            x = torch.randn(batch, *example.shape[1:])
            error = (run(x) - net(x)).abs().max().item()
            if not error <= _TOLERANCE:  # a NaN fails too
                raise ExportError(f"the {graph} differs from the network by {error:.2g} at batch {batch} (more than "
                                  f"{_TOLERANCE:g}); {hint}")


def _onnx_bytes(net: nn.Module, example: torch.Tensor, config_text: str) -> tuple[bytes, bool]:
    import onnx  # the exporter needs onnx and onnxscript; imported here so other modes do not pay for them

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(net, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
                                    dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}})
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {model_dir.CONFIG_FILE: config_text})
    onnx.checker.check_model(proto)
    graph = proto.SerializeToString()
    try:
        import onnxruntime as ort  # a test extra, not a dependency: without it the graph is not run here
    except ImportError:
        return graph, False
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its graph-optimiser notices are not the user's business
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])

    _check("ONNX graph (onnxruntime)", run, net, example,
           "the exporter changed what the network computes; try -o Export.format=torchscript")
    return graph, True


def _torchscript_bytes(net: nn.Module, example: torch.Tensor, config_text: str) -> tuple[bytes, bool]:
    # tracing warns that it is deprecated and about Python booleans taken from tensors (shape checks in timm and
    # nn.MultiheadAttention); the graph is checked at other batch sizes instead
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(net, example)
        _check("traced graph", traced, net, example,
               "the trace fixed a batch-dependent value; use -o Export.format=onnx")
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={model_dir.CONFIG_FILE: config_text})
    return buffer.getvalue(), True


_WRITERS = {"onnx": _onnx_bytes, "torchscript": _torchscript_bytes}


def export_model(model: str, out: str, fmt: str) -> tuple[str, bool]:
    """Write the inference folder ``out`` (local or ``s3://``) of the model folder ``model``.

    Args:
        model: a model folder, as written by training.
        out: the inference folder; its files are replaced, and the graph of the other format is removed.
        fmt: ``onnx`` or ``torchscript``.

    Returns:
        The URI of the graph, and whether the graph was run against the network (False: ONNX without onnxruntime).

    Raises:
        ValueError: an unknown format, or ``model`` is missing or not a loadable model folder.
        ExportError: the network does not export, or its graph computes something else; nothing is written then.
    """
    if fmt not in GRAPH_FILES:
        raise ValueError(f"Export.format: {fmt!r} is not one of {', '.join(GRAPH_FILES)}")
    net, info = model_dir.load(model)  # checks the folder: its yml parses and its weights fit the network
    config = storage.read_bytes(storage.join(model, model_dir.CONFIG_FILE))
    weights = storage.read_bytes(storage.join(model, model_dir.WEIGHTS_FILE))
    size = info.spec.image_size
    example = torch.randn(_EXAMPLE_BATCH, 3, size, size)  # [N, 3, S, S], already normalised
    try:
        graph, checked = _WRITERS[fmt](_WithSigmoid(net).eval(), example, config.decode("utf-8"))
    except ExportError as exc:
        raise ExportError(f"{model}: {exc}") from None
    except Exception as exc:  # the exporters raise many types; all mean the same to the user
        reason = " ".join(str(exc).split())[:500]
        other = next(f for f in GRAPH_FILES if f != fmt)
        raise ExportError(f"{model}: {info.spec.backbone} does not export to {fmt} ({type(exc).__name__}: "
                          f"{reason}); try -o Export.format={other}") from exc
    uri = storage.join(out, GRAPH_FILES[fmt])
    storage.write_bytes(uri, graph)
    storage.write_bytes(storage.join(out, model_dir.WEIGHTS_FILE), weights)
    storage.write_bytes(storage.join(out, model_dir.CONFIG_FILE), config)  # last: a folder with it is complete
    for stale in GRAPH_FILES.values():
        if stale != GRAPH_FILES[fmt]:
            storage.delete(storage.join(out, stale))
    return uri, checked


def run_export(cfg: Config) -> int:
    """Export ``Export.weight_path`` (default ``<Global.output>/best_model``) to ``<Global.output>/inference``;
    returns the exit code. A failure leaves ``{"done_flag": false, ...}`` in ``export_result.json``."""
    output = cfg["Global.output"]
    with results.failure_recorded(output, EXPORT_RESULT):
        model = storage.absolute(cfg["Export.weight_path"] or storage.join(output, "best_model"))
        fmt = cfg["Export.format"]
        out = storage.join(output, INFERENCE_DIR)
        graph, checked = export_model(model, out, fmt)
        info = model_dir.read_info(out)
        size, classes = info.spec.image_size, info.spec.num_classes
        files = [GRAPH_FILES[fmt], model_dir.WEIGHTS_FILE, model_dir.CONFIG_FILE]
        results.write_result(output, EXPORT_RESULT, {
            "done_flag": True,
            "model_name": info.spec.name,
            "model_dir": model,
            "format": fmt,
            "inference_dir": INFERENCE_DIR,
            "files": [f"{INFERENCE_DIR}/{f}" for f in files],  # relative to Global.output, as train_result's
            "opset": OPSET if fmt == "onnx" else None,
            "checked": checked,  # the graph reproduced the network at batch 1 and 3 (false: no onnxruntime here)
            "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [None, 3, size, size]},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, classes]},
        })
    print(f"exported {model} as {fmt}: {graph} (input {INPUT_NAME} [N, 3, {size}, {size}] float32, output "
          f"{OUTPUT_NAME} [N, {classes}] sigmoid); the folder {out} is also a model folder for predict")
    if not checked:
        print("the ONNX graph was not run here (onnxruntime is not installed), so it was not compared with the "
              "network; install onnxruntime and export again to have it checked")
    return 0
