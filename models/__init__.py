"""The segmentation network, its training and its shipped weights.

``load_model()`` returns the shipped U-Net (``weights/lungmets_unet_v5.pt`` and the JSON config
beside it, which rebuilds the network and names its input resolution and normalisation);
``load_model(path)`` loads a user's fine-tuned model saved by `models.train.save_model`.
Weights are plain tensors loaded with ``torch.load(..., weights_only=True)``: no pickled code
is ever run. On a CPU, where the model has an ONNX export of its tensors and ONNX Runtime runs
it (`models.runtime`), PyTorch is not even imported: the tensors are loaded on first use of
`LoadedModel.net` (training, ``--runtime torch``, a GPU).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = WEIGHTS_DIR / "lungmets_unet_v5.pt"

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_model", "model_config"]

_RUNNERS_LOCK = threading.Lock()
log = logging.getLogger(__name__)


class LoadedModel:
    """A network ready for inference, with its config (``config['input_um_per_px']`` ...).

    `device` is a torch device's name (``"cpu"``, ``"cuda:0"``, ``"mps"``). `net`, the
    PyTorch network, is built from the tensors on first use where it was not given (a
    CPU run through ONNX Runtime never needs it, nor PyTorch)."""

    def __init__(self, net, config: dict, path: Path, device):
        self._net = net
        self._net_lock = threading.Lock()
        self.config = config
        self.path = path
        self.device = str(device)
        self._runners: dict = {}

    @property
    def device_type(self) -> str:
        """``"cpu"``, ``"cuda"`` or ``"mps"``."""
        return self.device.split(":")[0]

    @property
    def net(self):
        """The PyTorch network (`models.unet.UNet`), in eval mode on `device`."""
        with self._net_lock:
            if self._net is None:
                self._net = _torch_net(self.path, self.config, self.device)
            return self._net

    @functools.cached_property
    def fast_net(self):
        """The network fused and channels-last for inference (`models.infer.fast_inference_net`;
        built once, on first use)."""
        from .infer import fast_inference_net

        return fast_inference_net(self.net)

    def inference_net(self, threads: int = 0, runtime: str = "auto"):
        """The network to run forward passes with: on the CPU, ONNX Runtime's session of the
        model's ONNX export where it has one (`models.runtime`; `threads` per pass, 0: one
        per core), else the fused PyTorch network (`fast_net`, also on a GPU or with
        ``runtime="torch"``); with ``runtime="int8"``, its 8-bit quantisation
        (`models.runtime.quantize_onnx`) where it has one, else the float export (with a
        warning). Sessions are built once per runtime and thread count."""
        if runtime not in ("auto", "torch", "int8"):
            raise ValueError(f"runtime must be 'auto', 'torch' or 'int8', got {runtime!r}")
        if runtime == "torch" or self.device_type != "cpu":
            return self.fast_net
        from .runtime import OnnxNet, onnx_file

        with _RUNNERS_LOCK:
            key = (runtime, threads)
            if key not in self._runners:
                path = None
                if runtime == "int8":
                    path = onnx_file(self.path, self.config, "onnx_int8")
                    if path is None:
                        log.warning(
                            "%s has no 8-bit export of its tensors (models.runtime."
                            "quantize_onnx): --runtime int8 runs the float network",
                            self.path.name,
                        )
                if path is None:
                    path = onnx_file(self.path, self.config)
                self._runners[key] = self.fast_net if path is None else OnnxNet(path, threads)
            return self._runners[key]

    @property
    def sha256(self) -> str:
        return self.config["sha256"]

    @property
    def depth(self) -> int:
        return self.net.depth

    def __repr__(self) -> str:
        return f"LoadedModel({self.path.name}, device={self.device}, sha256={self.sha256[:12]})"


def model_config(path: str | Path | None = None) -> dict:
    """The JSON config beside a weights file (no torch needed)."""
    from histo.errors import InputError

    path = Path(path) if path else DEFAULT_MODEL
    cfg_path = path.with_suffix(".json")
    if not path.exists():
        raise InputError(f"{path}: no such model file; check --model")
    if not cfg_path.exists():
        raise InputError(
            f"{path}: its config {cfg_path.name} is missing; a lungmets model is a .pt file with a "
            ".json beside it, as written by `lungmets train`"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{cfg_path}: not valid JSON ({exc}); re-save the model") from None
    if cfg.get("format") != "lungmets-model/1":
        raise InputError(
            f"{cfg_path}: not a lungmets model config (format "
            f"{cfg.get('format')!r}, expected 'lungmets-model/1')"
        )
    return cfg


#: Settings in a model's JSON, beside its tensors, that change what an analysis finds with it
#: (its operating point): part of every run's identity (`histo.batch.run_key`).
OPERATING_POINT = ("centre_threshold", "input_um_per_px")


def model_identity(path: str | Path | None = None) -> dict:
    """The model's SHA-256 and operating point: what a cached result with it depends on."""
    cfg = model_config(path)
    return {"sha256": cfg.get("sha256"), **{k: cfg.get(k) for k in OPERATING_POINT}}


def load_model(path: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Load a model (default: the shipped one) onto a device, checking its SHA-256.

    Raises
    ------
    histo.InputError
        If the file is missing, corrupt, altered (checksum), or not a lungmets model.
    """
    path = Path(path).resolve() if path else DEFAULT_MODEL
    from .infer import device_name

    return _load(str(path), device_name(device))


@functools.lru_cache(maxsize=4)
def _load(path_str: str, device: str) -> LoadedModel:
    from histo.errors import InputError

    from .runtime import onnx_file

    path = Path(path_str)
    cfg = model_config(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    if sha != cfg.get("sha256"):
        raise InputError(
            f"{path}: SHA-256 {sha[:16]}... does not match its config "
            f"({str(cfg.get('sha256'))[:16]}...); the file is corrupt or was changed: reinstall "
            "lungmets or re-save the model"
        )
    arch = cfg.get("architecture", {})
    if arch.get("class") != "UNet":
        raise InputError(f"{path}: unknown architecture {arch.get('class')!r}")
    # On the CPU with an ONNX export of these very tensors, ONNX Runtime runs the passes: the
    # tensors (and PyTorch, about a second to import) wait until something asks for `net`.
    later = device == "cpu" and onnx_file(path, cfg) is not None
    return LoadedModel(None if later else _torch_net(path, cfg, device), cfg, path, device)


def _torch_net(path: Path, cfg: dict, device: str):
    import torch

    from histo.errors import InputError

    from .unet import UNet

    arch = cfg.get("architecture", {})
    net = UNet(**{k: v for k, v in arch.items() if k != "class"})
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # torch raises many types for bad files
        raise InputError(
            f"{path}: cannot load the weights ({type(exc).__name__}: {exc}); the "
            "file does not fit its config: re-save the model"
        ) from None
    return net.eval().to(device)
