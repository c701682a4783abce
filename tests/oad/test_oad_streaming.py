"""OnlineDetector.step equals the batched windowed evaluation, frame by frame."""

import warnings

import numpy as np
import pytest
import torch
from oad_helpers import AMB, C, D, tiny_models

from notelab.core.errors import ShapeError
from notelab.data.streams import OADWindows, StreamSet, Video
from notelab.eval.detection import drop_ambiguous_softmax
from notelab.oad import OnlineDetector, padded_windows, window_outputs


def test_padded_windows_are_the_past_frames():
    x = torch.arange(10.0).repeat(2, 1).T  # frame i has features (i, i)
    w = padded_windows(x, 4)
    assert w.shape == (10, 4, 2)
    assert torch.equal(w[6, :, 0], torch.tensor([3.0, 4, 5, 6]))
    assert torch.equal(w[1, :, 0], torch.tensor([0.0, 0, 0, 1]))  # zeros before frame 0


@pytest.mark.parametrize("model", tiny_models(), ids=lambda m: m.model_type + getattr(m.config, "cell", ""))
def test_step_equals_batched_windows(model):
    torch.manual_seed(0)
    video = torch.randn(30, D)
    batched = drop_ambiguous_softmax(window_outputs(model, video, batch_size=7).logits, AMB)
    det = OnlineDetector(model)
    streamed = torch.stack([det.step(f) for f in video])
    assert streamed.shape == (30, C - 1) and det.classes == [0, 1, 2, 3]
    torch.testing.assert_close(streamed, batched, rtol=1e-5, atol=1e-6)
    # from frame T-1 on these are the official evaluation windows (offset 0)
    labels = np.eye(C, dtype=np.float32)[np.zeros(30, dtype=int)]
    windows = OADWindows(
        StreamSet([Video("v", video.numpy(), labels)], list("abcde"), AMB), model.config.window, model.config.n_future
    )
    for i in (0, len(windows) - 1):
        item = windows[i]
        official = drop_ambiguous_softmax(model(item["features"][None]).logits, AMB)[0]
        torch.testing.assert_close(streamed[item["end"] - 1], official, rtol=1e-5, atol=1e-6)
    det.reset()
    torch.testing.assert_close(det.step(video[0]), streamed[0])


def test_step_bad_input():
    det = OnlineDetector(tiny_models()[0])
    with pytest.raises(ShapeError, match=f"\\({D},\\)"):
        det.step(torch.randn(D + 2))
    with pytest.raises(ShapeError, match="finite"):
        det.step(torch.full((D,), float("nan")))
    with pytest.raises(ShapeError, match=f"\\(frames, {D}\\)"):
        window_outputs(det.model, torch.randn(10, D - 1))


def test_batched_evaluation_runs_on_the_models_device_by_default():
    from notelab.oad.streaming import model_device

    model = tiny_models()[2]
    assert model_device(model, None) == torch.device("cpu")
    assert model_device(model, "meta") == torch.device("meta")
    seen = []

    class Seen(Exception):
        pass

    def record(_module, args):
        seen.append(args[0].device)
        raise Seen  # meta tensors hold no numbers to bring back: stop at the first batch

    model.to("meta").register_forward_pre_hook(record)
    with pytest.raises(Seen):
        window_outputs(model, torch.randn(12, D))  # no device given: the windows go where the model is
    assert seen == [torch.device("meta")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", tiny_models(), ids=lambda m: m.model_type + getattr(m.config, "cell", ""))
def test_cuda_graph_steps_equal_batched_windows(model):
    """On CUDA each frame replays the recorded graph of the window's forward pass, and scores as the batch does."""
    torch.manual_seed(0)
    video = torch.randn(20, D)
    batched = drop_ambiguous_softmax(window_outputs(model, video, device="cuda").logits, AMB)
    det = OnlineDetector(model, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture (eager fallback) fails the test
        streamed = torch.stack([det.step(f) for f in video])
    assert det.graph is not None and det.use_graph
    torch.testing.assert_close(streamed, batched, rtol=1e-3, atol=1e-4)
    det.reset()
    torch.testing.assert_close(det.step(video[0]), streamed[0], rtol=1e-5, atol=1e-6)
