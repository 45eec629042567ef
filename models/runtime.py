"""What runs the network's forward passes on the CPU: ONNX Runtime where it can, else PyTorch.

The shipped model comes with an ONNX export of its fused inference network
(`models.infer.fast_inference_net`) beside its tensors, named with its SHA-256 in the model's
JSON (``"onnx"``). On the CPU, ONNX Runtime runs its forward passes 1.4-1.7x faster than
PyTorch on this project's 2-core machine (batches of 4 crops of 160-512 px, 1 or 2 threads;
about a tenth off a whole screened run), with logits equal to PyTorch's within 1e-5
(BENCHMARKS.md, "Network speed"). Where ``onnxruntime`` is not installed, the export is
missing or does not belong to these tensors (a model trained by the user), or on a GPU,
PyTorch runs the network as before: the results are the same either way.

`export_onnx` writes the export (it needs the ``onnx`` package, a developer's tool only: the
users' installs never export). `quantize_onnx` writes its 8-bit copy (``--runtime int8``,
opt-in: faster, but a cell near the operating point may come out differently; BENCHMARKS.md
"Network speed (CPU)").
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: ONNX opset of the export: supported by every onnxruntime release of the last three years.
OPSET = 17


class OnnxNet:
    """A network as an ONNX Runtime session on the CPU, called on numpy batches.

    Parameters
    ----------
    path : str or Path
        The ``.onnx`` file.
    threads : int
        Threads of each forward pass (0: ONNX Runtime's default, one per physical core).
    """

    #: `models.infer.predict_maps` hands it numpy batches (no torch tensors).
    runs_numpy = True

    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Screened crops come in many shapes: no memory plan per shape (the arena stays).
        options.enable_mem_pattern = False
        self.path = Path(path)
        self.threads = int(threads)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, 3, Y, X) of a float32 batch (N, 4, Y, X)."""
        return self.session.run(None, {self._input: np.ascontiguousarray(batch, np.float32)})[0]

    def __repr__(self) -> str:
        return f"OnnxNet({self.path.name}, threads={self.threads})"


def onnx_file(model_path: str | Path, config: dict, kind: str = "onnx") -> Path | None:
    """The ONNX export of a model, when it has one that belongs to its tensors and is intact
    and ``onnxruntime`` is installed; else None (PyTorch runs the network). `kind` is
    ``"onnx"`` (the float export) or ``"onnx_int8"`` (its 8-bit quantisation,
    `quantize_onnx`)."""
    entry = config.get(kind)
    if not entry:
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.debug("onnxruntime not installed: the network runs in PyTorch")
        return None
    path = Path(model_path).with_name(entry.get("file", ""))
    if entry.get("exported_from") != config.get("sha256") or not path.is_file():
        log.debug("%s: no %s export of these tensors", model_path, kind)
        return None
    if hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("sha256"):
        log.warning("%s: checksum does not match the model's JSON; not used", path)
        return None
    return path


def export_onnx(model) -> Path:
    """Write the ONNX export of a loaded model's fused inference network beside its tensors
    and record it (file, SHA-256, the tensors it came from) in the model's JSON. Needs
    ``onnx``.

    Parameters
    ----------
    model : models.LoadedModel
        ``models.load_model(path)``.

    Returns
    -------
    Path
        The ``.onnx`` file.
    """
    import torch

    from histo.atomic import write_json

    from .infer import fast_inference_net

    cfg = dict(model.config)
    net = fast_inference_net(model.net).cpu()
    out = Path(model.path).with_suffix(".onnx")
    x = torch.zeros(1, int(cfg["architecture"]["in_channels"]), 64, 64)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        net,
        x.contiguous(memory_format=torch.channels_last),
        str(out),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": dynamic, "logits": dynamic},
        opset_version=OPSET,
        dynamo=False,
    )
    cfg["onnx"] = {
        "file": out.name,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "exported_from": cfg["sha256"],
        "opset": OPSET,
        "network": "fused inference network (models.infer.fast_inference_net)",
    }
    write_json(cfg, out.with_suffix(".json"))
    return out


#: The nodes `quantize_onnx` leaves in float: the first convolution (it reads the
#: log-compressed stains, whose range is the widest) and the head (the logits the cells are
#: called on). Quantising these too changed a lesion table on 1 of 6 held-out house-style
#: slides and 4 of 22 held-out family sections (measured with the candidate v7; BENCHMARKS.md
#: "Network speed (CPU)").
FLOAT_NODES = ("/down.0/down.0.0/down.0.0.0/Conv", "/head/Conv")


def quantize_onnx(model, batches, *, calibration: dict | None = None) -> Path:
    """Write the 8-bit quantisation of a model's ONNX export beside it and record it in the
    model's JSON (``"onnx_int8"``: file, SHA-256, the tensors and the float export it came
    from, the nodes left in float, the calibration slides). Static quantisation (QDQ,
    weights int8 per channel, activations uint8 with ranges from `batches`), `FLOAT_NODES`
    left in float. Needs ``onnx``; `lungmets run --runtime int8` uses it.

    Parameters
    ----------
    model : models.LoadedModel
        A model with an ONNX export (`export_onnx`).
    batches : list of numpy.ndarray
        Network inputs to calibrate on, float32 (1, 4, Y, X): `models.train.calibration_inputs`
        of validation slides.
    calibration : dict, optional
        What they are, recorded in the JSON (`models.train.calibration_inputs` gives the
        slides' names).

    Returns
    -------
    Path
        The ``.int8.onnx`` file.
    """
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from histo.atomic import write_json

    cfg = dict(model.config)
    src = onnx_file(model.path, cfg)
    if src is None:
        raise ValueError(f"{model.path}: no ONNX export of these tensors; run export_onnx first")
    batches = list(batches)
    if not batches:
        raise ValueError("quantize_onnx needs calibration batches")

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            b = next(self._it, None)
            return None if b is None else {"x": b}

    out = Path(model.path).with_suffix(".int8.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(FLOAT_NODES),
        )
    cfg["onnx_int8"] = {
        "file": out.name,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "exported_from": cfg["sha256"],
        "quantized_from": cfg["onnx"]["sha256"],
        "float_nodes": list(FLOAT_NODES),
        "calibration": {
            **(calibration or {}),
            "crops": len(batches),
            "crop_px": int(batches[0].shape[-1]),
        },
    }
    write_json(cfg, out.with_name(Path(model.path).with_suffix(".json").name))
    return out
