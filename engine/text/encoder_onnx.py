"""The opt-in ONNX Runtime backend of the encoder: exported locally from the torch model, optionally int8.

The transformer of a local sentence-transformers model (Transformer -> mean Pooling -> Normalize) is
exported once to ONNX with torch's exporter, and for "onnx-int8" quantized with ONNX Runtime's
dynamic, per-channel int8 quantization. Nothing is downloaded. The files are cached under
`cache_dir` by a hash of the model's weights and the library versions, so later loads take a
second. Tokenising, mean pooling and normalising stay those of the model, so the vectors agree with
the torch backend (cosine ~1.0 for "onnx", ~0.99 for "onnx-int8" on MiniLM; benchmarks/ measures it).
Needs the `onnx` extra: `pip install kindling[onnx]` (onnxruntime and onnx).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError
from ..vectors import normalise_rows

ONNX_OPSET = 17
#: ONNX Runtime on a CPU runs fastest at about this many texts per call (measured on MiniLM);
#: a larger configured batch_size is split, a smaller one kept.
MAX_BATCH = 32


def default_cache_dir() -> Path:
    """$KINDLING_CACHE, else $XDG_CACHE_HOME/kindling, else ~/.cache/kindling."""
    if os.environ.get("KINDLING_CACHE"):
        return Path(os.environ["KINDLING_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kindling"


def check_mean_pooled(model_dir: Path) -> None:
    """Refuse a model whose pipeline this backend would not reproduce (it mean-pools and normalises)."""
    modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
    cfg = {}
    if pooling is not None:
        cfg = json.loads((model_dir / pooling["path"] / "config.json").read_text(encoding="utf-8"))
    modes = {k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True}
    if isinstance(cfg.get("pooling_mode"), str):  # how sentence-transformers 6 saves it
        modes.add("pooling_mode_" + cfg["pooling_mode"] + ("_tokens" if cfg["pooling_mode"] == "mean" else ""))
    if (kinds[:2] != ["Transformer", "Pooling"] or kinds[2:] not in ([], ["Normalize"])
            or modes != {"pooling_mode_mean_tokens"}):
        raise ModelLoadError(f"the ONNX backend supports Transformer + mean Pooling models; {model_dir} has "
                             f"modules {kinds} and pooling {sorted(modes)}; use backend='torch'")


class OnnxTransformer:
    """Tokenizer + ONNX Runtime session + mean pooling: texts -> unit vectors, shape (n, dim) float32."""

    def __init__(self, st_model, model_dir: Path, quantize: bool, cache_dir: Path | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError("the ONNX encoder backend needs onnxruntime and onnx: "
                                 "pip install 'kindling[onnx]'") from exc
        check_mean_pooled(model_dir)
        self._tokenizer = st_model[0].tokenizer
        self._max_len = int(st_model.max_seq_length)
        self._lock = threading.Lock()  # a fast tokenizer must not be called from two threads at once
        self._names = list(self._tokenizer(["a"], return_tensors="np").keys())
        path = _exported(st_model, model_dir, self._names, quantize, cache_dir or default_cache_dir())
        opts = ort.SessionOptions()
        # Spinning worker threads steal the cores a busy host needs; latency barely changes.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """Unit vectors of `texts`, in order; batches are formed by length to limit padding."""
        out: np.ndarray | None = None
        order = np.argsort([-len(t) for t in texts], kind="stable")
        batch_size = max(1, min(batch_size, MAX_BATCH))
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            vecs = self._encode_batch([texts[i] for i in idx])
            if out is None:
                out = np.empty((len(texts), vecs.shape[1]), np.float32)
            out[idx] = vecs
        return out if out is not None else np.zeros((0, 0), np.float32)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            feed = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_len,
                                   return_tensors="np")
        feed = {k: np.asarray(feed[k], np.int64) for k in self._names}
        hidden = self._session.run(None, feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        return normalise_rows(pooled)


def _exported(st_model, model_dir: Path, names: list[str], quantize: bool, cache_dir: Path) -> Path:
    """The cached ONNX file for this model, exporting (and quantizing) it on first use."""
    folder = cache_dir / "onnx" / _fingerprint(model_dir)
    target = folder / ("model-int8.onnx" if quantize else "model.onnx")
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "model.onnx"
    if not fp32.exists():
        _atomic(fp32, lambda tmp: _export(st_model, names, tmp))
    if quantize:
        _atomic(target, lambda tmp: _quantize(fp32, tmp))
    return target


def _fingerprint(model_dir: Path) -> str:
    import onnxruntime
    import torch

    h = hashlib.sha256(f"{torch.__version__}|{onnxruntime.__version__}|{ONNX_OPSET}".encode())
    for f in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        if f.exists():
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:20]


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp.onnx")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _export(st_model, names: list[str], path: Path) -> None:
    import torch

    class Hidden(torch.nn.Module):  # positional inputs in `names` order -> last hidden state
        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(names, inputs))).last_hidden_state

    sample = st_model[0].tokenizer(["an example", "a longer example text"], padding=True, return_tensors="pt")
    axes = {n: {0: "batch", 1: "tokens"} for n in names + ["hidden"]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(st_model[0].auto_model.eval()), tuple(sample[n] for n in names), str(path),
                          input_names=names, output_names=["hidden"], dynamic_axes=axes,
                          opset_version=ONNX_OPSET, dynamo=False)


def _quantize(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel weights keep the cosine to the float model near 0.99; per-tensor gives ~0.96.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
