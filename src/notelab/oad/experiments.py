"""Build, train (through ``notelab.train.fit``), evaluate and time the detectors on a :class:`StreamSet`.

Evaluation follows the official protocol (OadTR ``test.py``): the windows of
:class:`~notelab.data.streams.OADWindows` with offset 0 (ambiguous current frames dropped), the
scores a softmax without the ambiguous class, per-frame mAP and mcAP over the action classes, and
the mAP of each anticipated step against the labels of the frames ahead.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from notelab.core.errors import CheckpointError, DataError, ShapeError, unknown_name
from notelab.data.streams import OADWindows, StreamSet
from notelab.eval.detection import drop_ambiguous_softmax, drop_column, frame_map, future_step_map
from notelab.oad.config import CausalTransformerConfig, OadTRConfig, RNNDetectorConfig, TRNConfig
from notelab.oad.loss import oad_loss
from notelab.oad.oadtr import CausalTransformer, OadTR
from notelab.oad.streaming import OnlineDetector, model_device
from notelab.oad.trn import TRN, RNNDetector

MODELS = ("oadtr", "trn", "lstm", "gru", "transformer")
_MODEL_CLASSES: dict[str, tuple[type[nn.Module], Any]] = {
    "oadtr": (OadTR, OadTRConfig),
    "transformer": (CausalTransformer, CausalTransformerConfig),
    "trn": (TRN, TRNConfig),
    "lstm": (RNNDetector, RNNDetectorConfig),
    "gru": (RNNDetector, RNNDetectorConfig),
}
_BY_TYPE = {cls.model_type: cls for cls, _ in _MODEL_CLASSES.values()}


def model_config(name: str, streams: StreamSet, preset: str = "small", **overrides: Any) -> Any:
    """The config of model ``name`` for ``streams`` (feature size, classes, ambiguous class) at ``preset``."""
    if name not in _MODEL_CLASSES:
        raise unknown_name("model", name, MODELS)
    data = {"d_in": streams.feature_dim, "n_classes": streams.n_classes, "ambiguous": streams.ambiguous}
    if name in ("lstm", "gru"):
        data["cell"] = name
    return _MODEL_CLASSES[name][1].from_name(preset, **{**data, **overrides})


def build_model(name: str, streams: StreamSet, preset: str = "small", seed: int = 0, **overrides: Any) -> nn.Module:
    cls = _MODEL_CLASSES[name][0] if name in _MODEL_CLASSES else None
    config = model_config(name, streams, preset, **overrides)
    torch.manual_seed(seed)
    return cls(config)  # type: ignore[misc]


def load_detector(path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Any detector saved with ``save_pretrained``, chosen by the ``model_type`` of its config.json."""
    path = Path(path)
    try:
        kind = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: expected a detector folder with config.json ({e})") from e
    if kind not in _BY_TYPE:
        raise CheckpointError(f"{path}: expected a model_type among {sorted(_BY_TYPE)}, got {kind!r}")
    return _BY_TYPE[kind].from_pretrained(path, device=device)


def check_compatible(model: nn.Module, streams: StreamSet) -> None:
    """Features and classes of ``streams`` must be the model's; a mismatch is one clear line."""
    c = model.config
    if streams.feature_dim != c.d_in:
        raise ShapeError(
            f"{streams.name}: the model expects {c.d_in}-d frame features, the data has {streams.feature_dim}"
        )
    if streams.n_classes != c.n_classes:
        raise ShapeError(f"{streams.name}: the model has {c.n_classes} classes, the labels have {streams.n_classes}")
    if streams.ambiguous != c.ambiguous:
        raise DataError(f"{streams.name}: the model's ambiguous class is {c.ambiguous}, the data's {streams.ambiguous}")


def windows_for(model: nn.Module, streams: StreamSet, training: bool, seed: int = 0) -> OADWindows:
    check_compatible(model, streams)
    return OADWindows(streams, model.config.window, model.config.n_future, training=training, seed=seed)


def train_detector(
    model: nn.Module, streams: StreamSet, config: Any, future_weight: float = 0.5, callbacks: Any = ()
) -> Any:
    """Train on the training windows (random offset per video) with ``CE(current) + future_weight CE(future)``."""
    from notelab.train import fit

    data = windows_for(model, streams, training=True, seed=config.seed)
    ambiguous = model.config.ambiguous

    def loss_fn(m: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        out = m(batch["features"])
        return oad_loss(out, batch["label"], batch["future"], ambiguous, future_weight)

    return fit(model, loss_fn, data, config, callbacks=callbacks)


@torch.no_grad()
def predict_windows(
    model: nn.Module, windows: OADWindows, batch_size: int = 512, device: str | torch.device | None = None
) -> dict[str, np.ndarray]:
    """Probabilities (ambiguous column dropped) and labels (same columns) of every window, current and future;
    on ``device`` (the model is moved there) or, by default, on the model's own device."""
    device = model_device(model, device)
    model = model.to(device).eval()
    amb = model.config.ambiguous
    probs, labels, fprobs, flabels = [], [], [], []
    for i in range(0, len(windows), batch_size):
        items = [windows[j] for j in range(i, min(i + batch_size, len(windows)))]
        x = torch.stack([it["features"] for it in items]).to(device)
        out = model(x)
        probs.append(drop_ambiguous_softmax(out.logits, amb).cpu().numpy())
        labels.append(drop_column(torch.stack([it["label"] for it in items]).numpy(), amb))
        if out.future is not None:
            fprobs.append(drop_ambiguous_softmax(out.future, amb).cpu().numpy())
            flabels.append(drop_column(torch.stack([it["future"] for it in items]).numpy(), amb))
    result = {"probs": np.concatenate(probs), "labels": np.concatenate(labels)}
    if fprobs:
        result["future_probs"], result["future_labels"] = np.concatenate(fprobs), np.concatenate(flabels)
    return result


def evaluate_detector(
    model: nn.Module, streams: StreamSet, batch_size: int = 512, device: str | torch.device | None = None
) -> dict[str, Any]:
    """Per-frame mAP, mcAP and (for anticipating models) the mAP of each future step, batched on ``device``
    (default: the model's own, so a model trained on the GPU is scored there)."""
    pred = predict_windows(model, windows_for(model, streams, training=False), batch_size, device)
    scores = frame_map(pred["probs"], pred["labels"], ignore=(streams.background,))
    out: dict[str, Any] = {"mAP": scores.mAP, "mcAP": scores.mcAP, "frames": len(pred["probs"]), "ap": scores.ap}
    if "future_probs" in pred:
        out["future_mAP"] = future_step_map(pred["future_probs"], pred["future_labels"], ignore=(streams.background,))
    return out


def stream_speed(
    model: nn.Module,
    n_frames: int = 200,
    warmup: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_seconds: float | None = None,
) -> dict[str, float]:
    """Frames per second and per-frame latency (p50 / p99, ms) of :class:`OnlineDetector` on random features.

    ``warmup`` frames first (on CUDA the first one records the graph); then up to ``n_frames`` timed
    frames, stopping early after ``max_seconds``; ``frames`` says how many were timed.
    """
    det = OnlineDetector(model, device=device)
    feats = torch.randn(n_frames + warmup, model.config.d_in, generator=torch.Generator().manual_seed(seed))
    for f in feats[:warmup]:
        det.step(f)
    times = []
    t0 = time.perf_counter()
    for f in feats[warmup:]:
        s = time.perf_counter()
        det.step(f)  # returns a CPU tensor: synchronises with the device
        times.append(time.perf_counter() - s)
        if max_seconds is not None and s + times[-1] - t0 > max_seconds:
            break
    total = time.perf_counter() - t0
    ms = np.asarray(times) * 1e3
    return {
        "frames_per_s": len(times) / total,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "frames": len(times),
    }
