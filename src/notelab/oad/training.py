"""Train the detectors (through ``notelab.train.fit``) and evaluate them on a :class:`StreamSet`.

Evaluation follows the official protocol (OadTR ``test.py``): the windows of
:class:`~notelab.data.streams.OADWindows` with offset 0 (ambiguous current frames dropped), the
scores a softmax without the ambiguous class, per-frame mAP and mcAP over the action classes, and
the mAP of each anticipated step against the labels of the frames ahead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from notelab.data.streams import OADWindows, StreamSet
from notelab.eval.detection import drop_ambiguous_softmax, drop_column, frame_map, future_step_map
from notelab.oad.factory import check_compatible
from notelab.oad.loss import oad_loss
from notelab.oad.streaming import model_device


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
