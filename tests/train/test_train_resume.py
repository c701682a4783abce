import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_toys import mse_loss, run_resumable, toy_data, toy_model

from notelab.core.checkpoint import save_weights
from notelab.core.errors import CheckpointError
from notelab.train import TrainConfig, find_checkpoint, fit, load_checkpoint, save_checkpoint
from notelab.train import state as state_mod
from notelab.train.loop import param_groups

HERE = Path(__file__).parent


class Interrupt(Exception):
    pass


def stop_at(k):
    def cb(step, logs):
        if step == k:
            raise Interrupt

    return cb


def checkpoint_tensors(out_dir):
    ckpt = Path(out_dir) / "checkpoint"
    return {f: load_file(ckpt / f) for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")}


def assert_identical(a, b):
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}:{key}"


def comparable(records):
    drop = ("seconds", "samples_per_s")
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    ref = run_resumable(str(tmp_path / "ref"))
    with pytest.raises(Interrupt):
        run_resumable(str(tmp_path / "cut"), callbacks=[stop_at(8)])
    assert json.loads((tmp_path / "cut/checkpoint/trainer_state.json").read_text())["step"] == 6
    # A model built from another seed: every weight must come from the checkpoint.
    res = run_resumable(str(tmp_path / "cut"), resume=True, seed=123)
    assert res.step == 10
    for p, q in zip(ref.model.parameters(), res.model.parameters()):
        assert torch.equal(p, q)
    assert_identical(checkpoint_tensors(tmp_path / "ref"), checkpoint_tensors(tmp_path / "cut"))
    # The log of the resumed run continues the old one: records after the checkpoint are redone.
    assert comparable(res.history) == comparable(ref.history)
    assert [r["step"] for r in res.history] == [2, 4, 6, 8, 10]


def test_sigkilled_subprocess_resumes_bit_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HERE / "fit_worker.py"), str(tmp_path / "cut")]
    killed = subprocess.run([*cmd, "8"], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert json.loads((tmp_path / "cut/checkpoint/trainer_state.json").read_text())["step"] == 6
    run_resumable(str(tmp_path / "cut"), resume=True, seed=1)
    run_resumable(str(tmp_path / "ref"))
    assert_identical(checkpoint_tensors(tmp_path / "ref"), checkpoint_tensors(tmp_path / "cut"))


def test_failure_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = toy_model()
    fit(model, mse_loss, toy_data(), TrainConfig(steps=4, batch_size=8, out_dir=str(tmp_path), progress=False))
    before = load_file(tmp_path / "checkpoint" / "model.safetensors")
    real_save = state_mod.save_weights

    def save_then_crash(state, path, metadata=None):
        real_save(state, path, metadata)
        if Path(path).name == "optimizer.safetensors":
            raise OSError("disk full")

    monkeypatch.setattr(state_mod, "save_weights", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        fit(
            model,
            mse_loss,
            toy_data(),
            TrainConfig(steps=8, batch_size=8, out_dir=str(tmp_path), progress=False, resume=True),
        )
    monkeypatch.undo()
    # no half-written directory left behind (TensorBoard's, where it is installed, is the logger's)
    assert sorted(set(os.listdir(tmp_path)) - {"tensorboard"}) == ["checkpoint", "log.jsonl"]
    after = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    loaded = load_checkpoint(tmp_path / "checkpoint", model=toy_model(seed=5))
    assert loaded.step == 4


def test_checkpoint_moved_aside_by_a_crash_is_still_found(tmp_path):
    fit(toy_model(), mse_loss, toy_data(), TrainConfig(steps=2, batch_size=8, out_dir=str(tmp_path), progress=False))
    os.replace(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")  # the instant inside atomic_dir
    assert find_checkpoint(tmp_path) == tmp_path / ".checkpoint.old"
    res = fit(
        toy_model(),
        mse_loss,
        toy_data(),
        TrainConfig(steps=3, batch_size=8, out_dir=str(tmp_path), progress=False, resume=True),
    )
    assert res.step == 3 and res.history[-1]["step"] == 3
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"


def test_resume_into_a_different_model_is_a_checkpoint_error(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=8, out_dir=str(tmp_path), progress=False)
    fit(toy_model(hidden=16), mse_loss, toy_data(), cfg)
    resume = TrainConfig(steps=4, batch_size=8, out_dir=str(tmp_path), progress=False, resume=True)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        fit(toy_model(hidden=8), mse_loss, toy_data(), resume)


def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    fit(toy_model(), mse_loss, toy_data(), TrainConfig(steps=2, batch_size=8, out_dir=str(tmp_path), progress=False))
    weights = tmp_path / "checkpoint" / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        load_checkpoint(
            tmp_path / "checkpoint", model=toy_model(), optimizer=torch.optim.AdamW(toy_model().parameters())
        )


def test_resume_without_checkpoint_starts_fresh_with_a_warning(tmp_path, caplog):
    cfg = TrainConfig(steps=3, batch_size=8, out_dir=str(tmp_path / "new"), progress=False, resume=True)
    with caplog.at_level(logging.WARNING, logger="notelab.train"):
        res = fit(toy_model(), mse_loss, toy_data(), cfg)
    assert "no checkpoint" in caplog.text and res.step == 3
    fresh = fit(toy_model(), mse_loss, toy_data(), TrainConfig(steps=3, batch_size=8, progress=False))
    assert all(torch.equal(p, q) for p, q in zip(res.model.parameters(), fresh.model.parameters()))


def test_optimizer_state_round_trip(tmp_path):
    model = toy_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(2):
        mse_loss(model, toy_data(8), None).backward()
        opt.step()
    save_checkpoint(tmp_path / "ck", step=2, config=TrainConfig(), model=model, optimizer=opt)
    model2 = toy_model(seed=3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    load_checkpoint(tmp_path / "ck", model=model2, optimizer=opt2)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]  # betas come back as a tuple
    for pid in a["state"]:
        for key in a["state"][pid]:
            assert torch.equal(a["state"][pid][key], b["state"][pid][key])
    assert not list(Path(tmp_path).rglob("*.pkl")) and not list(Path(tmp_path).rglob("*.pt"))


def _saved(tmp_path, amsgrad=False):
    """A checkpoint of two AdamW steps on the toy model; returns (checkpoint dir, fresh model, fresh optimizer)."""
    model = toy_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=amsgrad)
    for _ in range(2):
        mse_loss(model, toy_data(8), None).backward()
        opt.step()
    save_checkpoint(tmp_path / "ck", step=2, config=TrainConfig(), model=model, optimizer=opt)
    fresh = toy_model(seed=3)
    return tmp_path / "ck", fresh, torch.optim.AdamW(fresh.parameters(), lr=1.0)


def _edit_state(ck, edit):
    path = ck / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.update(step="3"), r"expected a non-negative integer 'step', got '3'"),
        (lambda s: s.update(step=-1), r"'step', got -1"),
        (lambda s: s.update(step=True), r"'step', got True"),
        (lambda s: s.update(format_version=2), r"expected format_version 1, got 2"),
        (lambda s: s.pop("format_version"), r"expected format_version 1, got None"),
        (lambda s: s.update(config=[1]), r"expected an object 'config'"),
        (lambda s: s.update(optimizer="adam"), r"expected an object 'optimizer'"),
        (lambda s: s.update(world_size=0), r"expected a positive integer 'world_size', got 0"),
        (lambda s: s.update(seconds=-1), r"expected a non-negative number 'seconds', got -1"),
        (lambda s: s["optimizer"].update(param_groups={"lr": 1}), r"param_groups: expected a list of objects"),
        (lambda s: s["optimizer"].update(param_groups=[1]), r"param_groups: expected a list of objects"),
        (
            lambda s: s["optimizer"]["param_groups"][0].pop("params"),
            r"param groups of sizes \[\d+\], checkpoint has \[None\]",
        ),
        (lambda s: s["optimizer"]["param_groups"][0].update(evil=1), r"param_groups\[0\]: unknown key\(s\) evil"),
        (
            lambda s: s["optimizer"]["param_groups"][0].update(lr="fast"),
            r"param_groups\[0\]\.lr: expected a value like",
        ),
        (lambda s: s["optimizer"]["param_groups"][0].update(betas=[0.9]), r"param_groups\[0\]\.betas"),
        (lambda s: s["optimizer"]["param_groups"][0]["params"].reverse(), r"param_groups\[0\]\.params: expected"),
        (lambda s: s["optimizer"].update(state=[]), r"optimizer\.state: expected an object"),
        (lambda s: s["optimizer"].update(state={"99": {}}), r"optimizer\.state\.99: expected a parameter index"),
    ],
)
def test_trainer_state_fields_are_checked(tmp_path, edit, match):
    ck, model, opt = _saved(tmp_path)
    _edit_state(ck, edit)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(ck, model=model, optimizer=opt)
    assert "\n" not in str(e.value)


def test_optimizer_flags_from_the_file_are_not_honoured(tmp_path):
    ck, model, opt = _saved(tmp_path)

    def flip(state):
        state["optimizer"]["param_groups"][0].update(maximize=True, foreach=True, differentiable=True, capturable=True)

    _edit_state(ck, flip)
    load_checkpoint(ck, model=model, optimizer=opt)
    group = opt.param_groups[0]
    assert group["lr"] == 1e-2  # a hyper-parameter comes from the checkpoint
    assert (group["maximize"], group["foreach"], group["differentiable"], group["capturable"]) == (
        False,
        None,
        False,
        False,
    )
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        opt.zero_grad()
        mse_loss(model, toy_data(8), None).backward()
        opt.step()
    assert mse_loss(model, toy_data(8), None) < mse_loss(_with(model, before), toy_data(8), None)


def _with(model, params):
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(other.parameters(), params):
            p.copy_(q)
    return other


def test_amsgrad_mismatch_is_a_checkpoint_error(tmp_path):
    ck, model, _ = _saved(tmp_path, amsgrad=False)
    with pytest.raises(
        CheckpointError, match=r"param_groups\[0\]\.amsgrad: the optimizer has True, the checkpoint False"
    ):
        load_checkpoint(ck, model=model, optimizer=torch.optim.AdamW(model.parameters(), amsgrad=True))


@pytest.mark.parametrize(
    "name, tensor, match",
    [
        (
            "state.0.exp_avg",
            torch.zeros(5, 3),
            r"state\.0\.exp_avg: expected shape \(16, 3\) \(its parameter's\), got \(5, 3\)",
        ),
        (
            "state.0.exp_avg",
            torch.zeros(16, 3, dtype=torch.int64),
            r"state\.0\.exp_avg: expected dtype float32 .*got int64",
        ),
        ("state.0.exp_avg", torch.zeros(16, 3, dtype=torch.float64), r"expected dtype float32 .*got float64"),
        ("state.0.step", torch.zeros((), dtype=torch.bool), r"state\.0\.step: expected a numeric scalar"),
        ("state.77.exp_avg", torch.zeros(2), r"unexpected optimizer tensor 'state\.77\.exp_avg'"),
        ("bogus", torch.zeros(2), r"unexpected optimizer tensor 'bogus'"),
    ],
)
def test_optimizer_tensors_are_checked(tmp_path, name, tensor, match):
    ck, model, opt = _saved(tmp_path)
    tensors = load_file(ck / "optimizer.safetensors")
    tensors[name] = tensor
    save_weights(tensors, ck / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(ck, model=model, optimizer=opt)
    assert "\n" not in str(e.value)


def test_find_checkpoint_removes_dead_writers_temporaries_at_start(tmp_path):
    fit(toy_model(), mse_loss, toy_data(), TrainConfig(steps=2, batch_size=8, out_dir=str(tmp_path), progress=False))
    stale_dir = tmp_path / ".checkpoint.0123456789ab.tmp"
    shutil.copytree(tmp_path / "checkpoint", stale_dir)  # as big as a checkpoint
    (tmp_path / ".log.jsonl.abcdef12.tmp").write_text("half")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    assert sorted(set(os.listdir(tmp_path)) - {"tensorboard"}) == ["checkpoint", "log.jsonl"]


def test_find_checkpoint_prefers_a_complete_checkpoint(tmp_path):
    fit(toy_model(), mse_loss, toy_data(), TrainConfig(steps=2, batch_size=8, out_dir=str(tmp_path), progress=False))
    os.replace(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")
    (tmp_path / "checkpoint").mkdir()  # not one save_checkpoint wrote: no trainer_state.json
    assert find_checkpoint(tmp_path) == tmp_path / ".checkpoint.old"
    shutil.rmtree(tmp_path / ".checkpoint.old")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"  # load_checkpoint will say what is wrong
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        load_checkpoint(tmp_path / "checkpoint", model=toy_model())


def test_a_fit_checkpoint_loads_into_a_plain_optimizer(tmp_path):
    fit(toy_model(), mse_loss, toy_data(), TrainConfig(steps=2, batch_size=8, out_dir=str(tmp_path), progress=False))
    model = toy_model(seed=4)
    opt = torch.optim.AdamW(param_groups(model, 0.0))  # fit's two groups, without the scheduler's initial_lr
    assert "initial_lr" not in opt.param_groups[0]
    loaded = load_checkpoint(tmp_path / "checkpoint", model=model, optimizer=opt)
    assert loaded.step == 2 and opt.param_groups[0]["initial_lr"] == TrainConfig().lr  # the scheduler's key is kept
