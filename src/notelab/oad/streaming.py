"""Streaming inference: one frame feature in, the current frame's class probabilities out.

:class:`OnlineDetector` keeps the last ``T`` features in a ring buffer ``(T, D)``; slot
``i mod T`` holds frame ``i``, so after frame ``t`` the window oldest-first is
``buffer[(t+1) mod T :] ++ buffer[: (t+1) mod T]``. Before ``T`` frames have arrived the missing
past is zeros. :func:`window_outputs` computes the same windows for a whole video at once (zeros
padded in front, one stride-1 window per frame) in batches, so streaming and batched evaluation
give the same scores; from frame ``T - 1`` on these are exactly the official evaluation windows.
Only frames ``<= t`` ever enter the score of frame ``t``.

On a CUDA device the window's forward pass is recorded once as a CUDA graph and replayed at every
frame: a streamed frame is one window of batch 1, where launching the kernels one by one from
Python costs more than running them (TRN's window is ``T (Q + 1)`` cell steps of small kernels).
:func:`stream_speed` times it: frames per second and per-frame latency.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.errors import ShapeError
from notelab.eval.detection import drop_ambiguous_softmax
from notelab.oad.oadtr import OADOutput


def padded_windows(features: torch.Tensor, window: int) -> torch.Tensor:
    """``(F, D)`` -> ``(F, T, D)``: window ``t`` is frames ``t-T+1 .. t``, zeros before frame 0."""
    padded = F.pad(features, (0, 0, window - 1, 0))
    return padded.unfold(0, window, 1).transpose(1, 2)


def as_features(x: np.ndarray | torch.Tensor, d_in: int, name: str = "features") -> torch.Tensor:
    """A float32 tensor ``(F, d_in)``; a wrong feature size is a :class:`ShapeError`."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    if t.ndim != 2 or t.shape[1] != d_in:
        raise ShapeError(f"{name}: expected (frames, {d_in}) features for this model, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ShapeError(f"{name}: expected finite features, got {int((~torch.isfinite(t)).sum())} NaN/inf value(s)")
    return t


def model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device``, or the model's own (its first parameter's) when None: batched evaluation runs where
    the model already is (the GPU after GPU training) unless told otherwise."""
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def window_outputs(
    model: nn.Module,
    features: np.ndarray | torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> OADOutput:
    """Every frame's output on a whole video, batched: logits ``(F, C)``, future ``(F, Q, C)`` or None.

    Runs on ``device`` (the model is moved there) or, by default, on the model's own device.
    """
    cfg = model.config
    x = as_features(features, cfg.d_in)
    device = model_device(model, device)
    model.to(device).eval()
    windows = padded_windows(x.to(device), cfg.window)
    outs = [model(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
    future = torch.cat([o.future for o in outs]).cpu() if outs[0].future is not None else None
    return OADOutput(torch.cat([o.logits for o in outs]).cpu(), future)


def record_cuda_graph(
    fn: Callable[[torch.Tensor], OADOutput], static_in: torch.Tensor
) -> tuple[torch.cuda.CUDAGraph, OADOutput]:
    """Warm ``fn`` up on a side stream (cuDNN / cuBLAS pick their algorithms outside the capture), then
    record ``fn(static_in)``: replaying the graph recomputes the returned tensors from ``static_in``'s
    current contents."""
    side = torch.cuda.Stream(static_in.device)
    side.wait_stream(torch.cuda.current_stream(static_in.device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(static_in)
    torch.cuda.current_stream(static_in.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static_in)
    return graph, out


class OnlineDetector:
    """``step(feature (D,)) -> probabilities (K,)`` over every class but the ambiguous one (``classes``)."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.config = model.config
        self.device = torch.device(device)
        self.buffer = torch.zeros(self.config.window, self.config.d_in, device=self.device)
        self.frames = 0  # frames seen since the last reset
        amb = self.config.ambiguous
        self.classes = [c for c in range(self.config.n_classes) if c != amb]
        # CUDA: the window's forward pass as a graph (static input, static output), recorded at the first frame
        self.graph: tuple[torch.cuda.CUDAGraph, torch.Tensor, OADOutput] | None = None
        self.use_graph = self.device.type == "cuda"

    def reset(self) -> None:
        self.buffer.zero_()
        self.frames = 0

    def window(self) -> torch.Tensor:
        """The ring buffer oldest-first, ``(T, D)``."""
        head = self.frames % self.config.window
        return torch.cat([self.buffer[head:], self.buffer[:head]])

    @torch.no_grad()
    def step_output(self, feature: np.ndarray | torch.Tensor) -> OADOutput:
        """Push one frame; the model's output on the window ending at it (batch of one)."""
        f = torch.as_tensor(
            np.asarray(feature) if not isinstance(feature, torch.Tensor) else feature, dtype=torch.float32
        )
        if f.shape != (self.config.d_in,):
            raise ShapeError(f"step: expected one frame feature ({self.config.d_in},), got {tuple(f.shape)}")
        if not bool(torch.isfinite(f).all()):
            raise ShapeError("step: expected a finite frame feature, got NaN/inf")
        self.buffer[self.frames % self.config.window] = f.to(self.device)
        self.frames += 1
        return self.forward(self.window()[None])

    @torch.no_grad()
    def forward(self, window: torch.Tensor) -> OADOutput:
        """The model on ``window`` ``(1, T, D)``: eager, or on CUDA the replay of the recorded graph."""
        if not self.use_graph:
            return self.model(window)
        if self.graph is None:
            static_in = window.clone()
            try:
                self.graph = (*record_cuda_graph(self.model, static_in), static_in)  # type: ignore[assignment]
            except RuntimeError as e:  # an op that cannot be captured: stream eagerly, said once
                warnings.warn(f"OnlineDetector: CUDA graph capture failed ({e}); eager steps", RuntimeWarning)
                self.use_graph = False
                return self.model(window)
        graph, out, static_in = self.graph  # type: ignore[misc]
        static_in.copy_(window)
        graph.replay()
        # the next replay overwrites the static output: hand out copies
        return OADOutput(out.logits.clone(), None if out.future is None else out.future.clone())

    def step(self, feature: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Push one frame; its class probabilities ``(K,)`` (softmax without the ambiguous class)."""
        return drop_ambiguous_softmax(self.step_output(feature).logits, self.config.ambiguous)[0].cpu()


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
