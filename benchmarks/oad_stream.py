"""Streaming and batched speed of the online action detectors (random weights: speed does not depend on training).

For each model and preset: ``OnlineDetector.step`` on one frame at a time (frames/s, per-frame
latency p50 / p99, after a warm-up), and the batched windowed evaluation ``window_outputs`` over a
whole video (frames/s). The official presets are OadTR's (3072-d inputs, T=64, 74.7M parameters)
and TRN's (4096 LSTM units, 64 steps, 8 anticipated). Streaming recomputes the whole window at
every frame for every model: that is what makes its scores equal to the windowed evaluation
(a recurrent model's state depends on where its window starts). Every timed run stops after
``--max-seconds`` (the official TRN streams ~0.2 TFLOP a frame), and the figures say how many
frames they timed.

    python benchmarks/oad_stream.py                                   # CPU, small presets and the official ones
    python benchmarks/oad_stream.py --device cuda --frames 300 --video 20000 --max-seconds 5   # ~70 s on an H200
    python benchmarks/oad_stream.py --models oadtr --presets small --frames 50 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from notelab.data.streams import StreamSet, Video
from notelab.oad import build_model, stream_speed, window_outputs


def fake_streams(d_in: int, n_classes: int = 22) -> StreamSet:
    """Only the shapes matter to ``build_model``: one video of the right feature size and classes."""
    return StreamSet(
        [Video("x", np.zeros((1, d_in), np.float32), np.zeros((1, n_classes), np.float32))],
        [str(c) for c in range(n_classes)],
        ambiguous=n_classes - 1,
    )


def batched_fps(model: torch.nn.Module, video: int, batch: int, device: str, budget_s: float) -> tuple[float, int]:
    """Windowed evaluation frames/s over at most ``video`` frames, sized to take about ``budget_s`` seconds.

    One window first (warm-up), then one full batch, timed: when it already fills the budget its time
    is the figure, otherwise it was the warm-up at full batch and sizes the timed run (the official
    TRN costs ~0.2 TFLOP a window).
    """
    x = torch.randn(video, model.config.d_in)
    window_outputs(model, x[:1], batch_size=1, device=device)
    n0 = min(video, batch)
    t0 = time.perf_counter()
    window_outputs(model, x[:n0], batch_size=batch, device=device)
    took = time.perf_counter() - t0
    n = int(min(video, budget_s * n0 / took))
    if n <= n0:  # one batch already filled the budget: its time is the figure
        return n0 / took, n0
    t0 = time.perf_counter()
    window_outputs(model, x[:n], batch_size=batch, device=device)
    return n / (time.perf_counter() - t0), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="oadtr,trn")
    p.add_argument("--presets", default="small,official")
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames", type=int, default=50, help="streamed frames timed per model")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--video", type=int, default=512, help="frames of the batched evaluation")
    p.add_argument("--batch", type=int, default=128, help="windows per batch in the batched evaluation")
    p.add_argument(
        "--max-seconds", type=float, default=5.0, help="time budget of each timed run (streaming, batched) per model"
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    )
    print("model\tpreset\tparams\tstream frames/s\tp50 ms\tp99 ms\tbatched frames/s")
    for preset in args.presets.split(","):
        d_in = 3072 if preset == "official" else 64
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = build_model(name, fake_streams(d_in), preset).eval()
            n = sum(q.numel() for q in model.parameters())
            # The official presets on a CPU: OadTR ~10 GFLOP and TRN ~180 GFLOP a frame: one warm-up frame.
            heavy = preset == "official" and args.device == "cpu"
            st = stream_speed(model, args.frames, 1 if heavy else args.warmup, 0, args.device, args.max_seconds)
            # On a CPU the official TRN's first full batch alone would take minutes: probe with a few windows.
            batch = min(args.batch, 4) if heavy else args.batch
            fps, n_video = batched_fps(model, args.video, batch, args.device, args.max_seconds)
            print(
                f"{name}\t{preset}\t{n:,}\t{st['frames_per_s']:.3g}\t{st['p50_ms']:.3g}\t{st['p99_ms']:.3g}\t{fps:.3g}"
            )
            print(
                json.dumps(
                    {
                        "model": name,
                        "preset": preset,
                        "params": n,
                        **st,
                        "batched_fps": fps,
                        "device": args.device,
                        "video": n_video,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
