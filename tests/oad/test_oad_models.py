"""OadTR / TRN / baselines: the official parameter count, shapes, ablations, causality, loss, save/load."""

import pytest
import torch
import torch.nn.functional as F
from oad_helpers import AMB, C, D, tiny_models

from notelab.core.errors import ConfigError, ShapeError
from notelab.oad import (
    TRN,
    OadTR,
    OadTRConfig,
    TRNConfig,
    load_detector,
    oad_loss,
    window_outputs,
)
from notelab.oad.loss import ignore_ambiguous_cross_entropy
from notelab.oad.oadtr import OADOutput

OFFICIAL_PARAMS = 74_709_036  # "number of params" printed by the official main.py (model/log_dist.txt)
UNUSED_QUERY_POSITIONS = 8 * 1024  # official decoder_position_encoding: nn.Embedding(8, 1024), never applied


def test_official_preset_parameter_count():
    config = OadTRConfig.from_name("official")
    assert (config.d_in, config.n_classes, config.window, config.n_layers, config.n_heads, config.d_model) == (
        3072,
        22,
        64,
        3,
        8,
        1024,
    )
    assert (config.n_dec_layers, config.n_future) == (5, 8)
    with torch.device("meta"):
        n = sum(p.numel() for p in OadTR(config).parameters())
    # The one published detail that differs: the official decoder builds a learned positional encoding of
    # its 8 queries (8 x 1024 = 8,192 parameters) that forward() never adds; notelab leaves it out.
    assert n == OFFICIAL_PARAMS - UNUSED_QUERY_POSITIONS, (
        f"{n:,} parameters; official {OFFICIAL_PARAMS:,} includes an unused 8x1024 query position table"
    )


def test_trn_official_preset_has_the_official_layers():
    """TRN.pytorch's THUMOS model: fusion Linear(3072, 3072), LSTMCell(3072 + 3072, 4096), LSTMCell(4096, 4096),
    hx / cx transforms Linear(4096, 4096), scores -> input Linear(22, 4096), future Linear(4096, 3072), classifier."""
    lin = lambda i, o: i * o + o  # noqa: E731
    cell = lambda i, h: 4 * h * (i + h) + 8 * h  # noqa: E731
    expected = (
        lin(3072, 3072)
        + cell(6144, 4096)
        + cell(4096, 4096)
        + 2 * lin(4096, 4096)
        + lin(22, 4096)
        + lin(4096, 3072)
        + lin(4096, 22)
    )
    with torch.device("meta"):
        n = sum(p.numel() for p in TRN(TRNConfig.from_name("official")).parameters())
    assert n == expected == 357_828_630


@pytest.mark.parametrize("model", tiny_models(), ids=lambda m: m.model_type + getattr(m.config, "cell", ""))
def test_shapes_bad_input_and_no_future_leak(model):
    model.eval()
    cfg = model.config
    out = model(torch.randn(3, cfg.window, D))
    assert out.logits.shape == (3, C)
    assert (out.future is None) == (cfg.n_future == 0)
    if out.future is not None:
        assert out.future.shape == (3, cfg.n_future, C)
    with pytest.raises(ShapeError, match=f"{D} features"):
        model(torch.randn(3, cfg.window, D + 1))
    with pytest.raises(ShapeError, match=f"{cfg.window} frames"):
        model(torch.randn(3, cfg.window + 1, D))
    # the score at frame t never depends on frames after t
    video = torch.randn(25, D)
    before = window_outputs(model, video).logits
    changed = video.clone()
    changed[13:] = torch.randn(12, D) * 5
    after = window_outputs(model, changed).logits
    assert torch.equal(before[:13], after[:13])
    assert not torch.allclose(before[13:], after[13:])


def test_ablations_are_configs():
    common = dict(d_in=D, n_classes=C, ambiguous=AMB)
    full = OadTR(OadTRConfig.from_name("tiny", **common))
    no_token = OadTR(OadTRConfig.from_name("tiny", task_token=False, **common))
    no_decoder = OadTR(OadTRConfig.from_name("tiny", n_dec_layers=0, n_future=0, **common))
    enc_only = OadTR(OadTRConfig.from_name("tiny", task_token=False, n_dec_layers=0, n_future=0, **common))
    d = full.config.d_model
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(full) - count(no_token) == 2 * d  # the token and its position
    assert no_decoder(torch.randn(2, 8, D)).future is None and enc_only.task_token is None
    assert count(no_decoder) - count(enc_only) == 2 * d
    with pytest.raises(ConfigError, match="n_future"):
        OadTRConfig.from_name("tiny", n_dec_layers=0, **common)
    with pytest.raises(ConfigError, match="ambiguous"):
        OadTRConfig(n_classes=5, ambiguous=5)


def test_task_token_reads_the_window():
    """The token's output (what the classifier reads) changes with any frame of the window, the oldest too."""
    m = OadTR(OadTRConfig.from_name("tiny", d_in=D, n_classes=C, ambiguous=AMB, n_dec_layers=0, n_future=0)).eval()
    x = torch.randn(1, 8, D)
    y = x.clone()
    y[0, 0] += 1.0
    assert not torch.allclose(m(x).logits, m(y).logits)


def test_loss_ignores_ambiguous_and_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(6, C, requires_grad=True)
    cls = torch.tensor([0, 1, 4, 2, 3, 4])  # rows 2 and 5 are ambiguous
    target = F.one_hot(cls, C).float()
    loss = ignore_ambiguous_cross_entropy(logits, target, AMB)
    keep = cls != AMB
    expected = F.cross_entropy(logits[keep][:, :AMB], cls[keep])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.all(logits.grad[:, AMB] == 0) and torch.all(logits.grad[~keep] == 0)
    all_amb = ignore_ambiguous_cross_entropy(logits, F.one_hot(torch.full((6,), AMB), C).float(), AMB)
    assert all_amb.item() == 0.0 and all_amb.requires_grad  # the graph stays whole (DDP needs every grad)
    future_logits = torch.randn(6, 3, C)
    future = F.one_hot(torch.randint(0, AMB, (6, 3)), C).float()
    total, metrics = oad_loss(OADOutput(logits, future_logits), target, future, AMB)
    ahead = ignore_ambiguous_cross_entropy(future_logits.flatten(0, 1), future.flatten(0, 1), AMB)
    assert torch.allclose(total, loss + 0.5 * ahead) and set(metrics) == {"ce_current", "ce_future"}
    assert float(metrics["ce_current"]) == pytest.approx(loss.item()) and not metrics["ce_future"].requires_grad


@pytest.mark.parametrize("index", [0, 2])
def test_save_and_load(tmp_path, index):
    model = tiny_models()[index].eval()
    model.save_pretrained(tmp_path)
    again = load_detector(tmp_path)
    assert type(again) is type(model) and again.config == model.config
    x = torch.randn(2, model.config.window, D)
    assert torch.equal(model(x).logits, again.eval()(x).logits)


def test_training_through_fit_learns_the_digit_streams():
    from notelab.data.streams import digits_streams
    from notelab.oad import build_model, evaluate_detector, train_detector
    from notelab.train import TrainConfig

    train, test = digits_streams("train"), digits_streams("test")
    model = build_model("oadtr", train, "tiny", seed=0)
    before = evaluate_detector(model, test)["mAP"]
    config = TrainConfig(steps=60, batch_size=32, lr=3e-3, progress=False, device="cpu", log_every=10, compile=False)
    run = train_detector(model, train, config)
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[-1] < losses[0]
    after = evaluate_detector(run.model, test)
    assert after["mAP"] > before + 0.04 and len(after["future_mAP"]) == 2


def trn_reference(m: TRN, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TRN's equations (the module docstring) one cell step at a time, read straight off the weights."""
    cfg = m.config
    h = c = torch.zeros(features.shape[0], cfg.d_hidden)
    u = torch.zeros(features.shape[0], cfg.d_fusion)
    for t in range(cfg.window):
        x = torch.relu(F.linear(features[:, t], m.fusion.weight, m.fusion.bias))
        h, c = m.enc(torch.cat([x, u], dim=-1), (h, c))
        g, k = torch.relu(m.h_to_dec(h)), torch.relu(m.c_to_dec(c))
        a, total, scores = torch.zeros_like(h), 0.0, []
        for _ in range(cfg.n_future):
            g, k = m.dec(a, (g, k))
            p = m.classifier(g)
            a = torch.relu(m.scores_to_input(p))
            scores.append(p)
            total = total + torch.relu(m.to_future(g))
        u = total / cfg.n_future
    return m.classifier(h), torch.stack(scores, dim=1)


@pytest.mark.parametrize("train_mode", [False, True])
def test_trn_equals_its_equations_step_by_step(train_mode):
    """The loop-lean TRN (fusion over the window at once, u from one matmul over the stacked decoder
    states, future scores stacked at the last step only) computes exactly the per-step equations."""
    torch.manual_seed(0)
    m = TRN(TRNConfig.from_name("small", d_in=D, n_classes=C, ambiguous=AMB, dropout=0.0)).train(train_mode)
    x = torch.randn(3, m.config.window, D)
    with torch.no_grad():
        out = m(x)
        logits, future = trn_reference(m, x)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.future, future, rtol=1e-5, atol=1e-6)
