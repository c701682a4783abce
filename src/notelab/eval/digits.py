"""FD-digits: the Frechet distance (FID's formula) in the feature space of a small digits classifier.

FID (Heusel et al. 2017) embeds images with an Inception network trained on ImageNet; for the
8x8 scikit-learn digits we train our own feature network once, the same way every time::

    x (B, 1, 8, 8) -> Conv3x3(16) -> ReLU -> Conv3x3(32, stride 2) -> ReLU -> flatten (512)
      -> Linear(64) -> ReLU  = features (B, 64)      (FID's pool3 counterpart)
      -> Linear(10)          = logits

It is trained on the fixed train split of ``load_dataset("digits")`` (seeded AdamW, 400 steps,
a few seconds of one CPU core) and reaches about 98% accuracy on the test split. The weights
are cached under ``notelab.core.runtime.cache_dir()`` as ``config.json`` + ``model.safetensors``,
written as one directory atomically; a cache that is missing, unreadable, from another recipe,
or below the accuracy floor is retrained, never unpickled.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, PretrainedMixin, save_weights
from notelab.core.config import save_config
from notelab.core.errors import CheckpointError, ConfigError, ShapeError
from notelab.core.io import atomic_dir
from notelab.core.runtime import cache_dir
from notelab.data import load_dataset
from notelab.eval.frechet import feature_statistics, frechet_distance

ACCURACY_FLOOR = 0.95  # a cached classifier below this on the test split is retrained


@dataclass
class DigitsClassifierConfig:
    channels: int = 16  # width of the first conv; the second has twice as many
    features: int = 64  # width of the penultimate layer (the FD features)
    n_classes: int = 10
    # Training recipe, part of the config so that a cache from another recipe is not reused.
    steps: int = 400  # AdamW steps on the train split
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


class DigitsClassifier(PretrainedMixin, nn.Module):
    """A small CNN on 8x8 digits; ``features(x)`` is the penultimate layer, ``forward(x)`` the logits."""

    config_class = DigitsClassifierConfig
    model_type = "digits_classifier"

    def __init__(self, config: DigitsClassifierConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.conv1 = nn.Conv2d(1, c.channels, 3, padding=1)
        self.conv2 = nn.Conv2d(c.channels, 2 * c.channels, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * c.channels * 4 * 4, c.features)
        self.head = nn.Linear(c.features, c.n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ShapeError(
                f"digits classifier: expected images of shape (N, 1, 8, 8) in [-1, 1], got {tuple(x.shape)}"
            )
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_digits_classifier(config: DigitsClassifierConfig | None = None) -> DigitsClassifier:
    """Train the classifier on the digits train split; deterministic for a given seed (on one machine)."""
    config = config or DigitsClassifierConfig()
    train = load_dataset("digits", split="train")
    x, y = train.x, train.y
    assert y is not None
    threads = torch.get_num_threads()
    # One thread: for a net this small, thread hand-offs cost more than they save (4x on a busy 2-core box).
    torch.set_num_threads(1)
    try:
        return _train(config, x, y)
    finally:
        torch.set_num_threads(threads)


def _train(config: DigitsClassifierConfig, x: torch.Tensor, y: torch.Tensor) -> DigitsClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = DigitsClassifier(config)
        gen = torch.Generator().manual_seed(config.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
        model.train()
        for _ in range(config.steps):
            idx = torch.randint(0, len(x), (config.batch_size,), generator=gen)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def _accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def _test_accuracy(model: DigitsClassifier) -> float:
    test = load_dataset("digits", split="test")
    assert test.y is not None
    return _accuracy(model, test.x, test.y)


def _load_cached(path: Path, config: DigitsClassifierConfig) -> DigitsClassifier | None:
    try:
        if DigitsClassifier.load_config(path) != config:
            return None
        model = DigitsClassifier.from_pretrained(path).eval()
    except (CheckpointError, ConfigError):
        return None
    return model if _test_accuracy(model) >= ACCURACY_FLOOR else None


_MEMO: dict[str, DigitsClassifier] = {}


def digits_classifier(cache: str | os.PathLike | None = None, retrain: bool = False) -> DigitsClassifier:
    """The FD-digits feature network: loaded from ``cache`` (default ``cache_dir()/digits_classifier``) or trained.

    Training writes the cache as a whole directory (temp dir + rename), so concurrent callers
    and crashes leave either no cache or a complete one.
    """
    path = Path(cache) if cache is not None else Path(cache_dir()) / "digits_classifier"
    key = str(path.resolve())
    if not retrain and key in _MEMO:
        return _MEMO[key]
    config = DigitsClassifierConfig()
    model = None if retrain else _load_cached(path, config)
    if model is None:
        model = train_digits_classifier(config)
        acc = _test_accuracy(model)
        if acc < ACCURACY_FLOOR:
            raise RuntimeError(f"digits classifier reached {acc:.3f} test accuracy, expected >= {ACCURACY_FLOOR}")
        try:
            with atomic_dir(path) as tmp:
                save_weights(model.state_dict(), tmp / WEIGHTS_NAME, metadata={"test_accuracy": f"{acc:.4f}"})
                save_config(config, tmp / CONFIG_NAME, model_type=DigitsClassifier.model_type)
        except OSError:
            pass  # another process renamed its copy in first, or the cache is read-only; the model is still good
    for p in model.parameters():
        p.requires_grad_(False)
    _MEMO[key] = model
    return model


def _as_images(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().cpu().float()
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ShapeError(f"{name}: expected digit images of shape (N, 1, 8, 8) in [-1, 1], got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ShapeError(f"{name}: expected finite values, found NaN or Inf")
    return x


@torch.no_grad()
def digits_features(
    x: torch.Tensor | np.ndarray, model: DigitsClassifier | None = None, batch_size: int = 2048
) -> torch.Tensor:
    """Penultimate-layer features ``(N, 64)`` of digit images ``x`` (N, 1, 8, 8) in [-1, 1]."""
    x = _as_images(x, "digits_features")
    model = model or digits_classifier()
    return torch.cat([model.features(b) for b in x.split(batch_size)]) if len(x) else torch.zeros(0, 64)


# Feature statistics of the real digits, per classifier (weak keys: a retrained model drops its entry).
_REFERENCE_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fd_digits(samples: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray | None = None) -> float:
    """FD-digits of ``samples`` (N, 1, 8, 8) in [-1, 1] against ``reference`` (default: all 1797 real digits).

    Like FID it is biased upwards for small N; compare runs at the same N (1,000+ recommended).
    """
    model = digits_classifier()
    mu1, s1 = feature_statistics(digits_features(samples, model))
    if reference is None:
        if model not in _REFERENCE_STATS:
            _REFERENCE_STATS[model] = feature_statistics(digits_features(load_dataset("digits").x, model))
        mu2, s2 = _REFERENCE_STATS[model]
    else:
        mu2, s2 = feature_statistics(digits_features(reference, model))
    return frechet_distance(mu1, s1, mu2, s2)


def digits_accuracy(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Fraction of digit images ``x`` (N, 1, 8, 8) that the FD-digits classifier labels as ``y`` (N,)."""
    x = _as_images(x, "digits_accuracy")
    y = torch.as_tensor(y).long().cpu()
    if y.shape != (len(x),):
        raise ShapeError(f"digits_accuracy: expected labels of shape ({len(x)},), got {tuple(y.shape)}")
    return _accuracy(digits_classifier(), x, y)
