"""A simulated crash at every filesystem event of a checkpoint save, then a second one at every event of the next.

The crash model is a process killed at event ``i`` (``kill -9``, the OOM killer): the event has
at most a partial effect (half of a file written, half of a tree deleted; a rename either
happens or not) and every later filesystem call of the "dead" process does nothing but raise,
so no ``finally`` clean-up gets to run either. Open descriptors are still closed, as the kernel
does for a dead process (which also drops its ``flock`` locks). Power loss, where unsynced data
vanishes, is the fsync discipline's job; :func:`test_every_file_and_rename_is_durable_before_the_old_copy_goes`
checks that order.

Events: ``os.replace / rename / mkdir / rmdir / unlink / remove / chmod / fsync`` and
``shutil.rmtree`` as called by ``notelab.core.io``, its ``write_file``, and the safetensors
``save_file`` that ``notelab.core.checkpoint`` calls.
"""

from __future__ import annotations

import os
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

import notelab.core.checkpoint as checkpoint_mod
import notelab.core.io as io_mod
from notelab.train import TrainConfig, find_checkpoint, load_checkpoint, save_checkpoint
from notelab.train.state import checkpoint_dir


class Crash(BaseException):
    """The simulated death of the process (a BaseException: nothing may catch it and carry on)."""


class Machine:
    """Counts filesystem events; at event ``crash_at`` the process dies (module docstring)."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.count = 0
        self.dead = False
        self.log: list[tuple[str, str]] = []
        self.fd_paths: dict[int, str] = {}

    def event(self, kind: str, path: object, partial=None) -> None:
        if self.dead:
            raise Crash
        index = self.count
        self.count += 1
        self.log.append((kind, str(path)))
        if index == self.crash_at:
            self.dead = True
            if partial is not None:
                partial()
            raise Crash


def _os_proxy(machine: Machine) -> types.SimpleNamespace:
    ns = types.SimpleNamespace()
    for name in dir(os):
        if not name.startswith("__"):
            setattr(ns, name, getattr(os, name))

    def wrap(name):
        real = getattr(os, name)

        def call(*args, **kwargs):
            machine.event(name, args[0] if name != "fsync" else machine.fd_paths.get(args[0], args[0]))
            if name == "fsync":
                return None  # the crash model needs no real flush, and the test stays fast
            return real(*args, **kwargs)

        return call

    for name in ("replace", "rename", "mkdir", "rmdir", "unlink", "remove", "chmod", "fsync"):
        setattr(ns, name, wrap(name))

    def open_(path, flags, *args):  # not an event; remembers which path an fsync'd descriptor is
        fd = os.open(path, flags, *args)
        machine.fd_paths[fd] = str(path)
        return fd

    ns.open = open_
    return ns


def _rmtree_half(path) -> None:
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    for p in files[: max(1, len(files) // 2)]:
        p.unlink()


def install(monkeypatch, machine: Machine) -> None:
    """Route notelab.core.io's and the safetensors writer's filesystem calls through ``machine``."""
    monkeypatch.setattr(io_mod, "os", _os_proxy(machine))

    def rmtree(path, *args, **kwargs):
        machine.event("rmtree", path, partial=lambda: _rmtree_half(path))
        shutil.rmtree(path, *args, **kwargs)

    monkeypatch.setattr(io_mod, "shutil", types.SimpleNamespace(rmtree=rmtree))
    real_write = io_mod.write_file

    def write_file(path, data):
        machine.event("write", path, partial=lambda: Path(path).write_bytes(data[: len(data) // 2]))
        real_write(path, data)

    monkeypatch.setattr(io_mod, "write_file", write_file)
    real_save = checkpoint_mod.save_file

    def save_file(tensors, path, metadata=None):
        def half():
            data = safetensors_bytes(tensors, metadata)
            Path(path).write_bytes(data[: len(data) // 2])

        machine.event("save_file", path, partial=half)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_mod, "save_file", save_file)


def model_and_optimizer(value: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A 2x2 linear layer whose weights all equal ``value`` (the step), with AdamW state."""
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model, opt


def save(out: Path, step: int, monkeypatch, machine: Machine | None = None) -> None:
    """``save_checkpoint`` of the step-``step`` model through ``machine`` (a machine that never crashes by default)."""
    model, opt = model_and_optimizer(step)
    with monkeypatch.context() as m:
        install(m, machine or Machine())
        save_checkpoint(checkpoint_dir(out), step=step, config=TrainConfig(), model=model, optimizer=opt)


def copy(src: Path, dst: Path) -> Path:
    """A copy of a run folder; hard links suffice, as nothing is ever modified in place."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def count_events(out: Path, step: int, monkeypatch) -> int:
    """Events of a save at ``step`` starting from the state of ``out`` (on a copy)."""
    dry = copy(out, out.parent / f"{out.name}-dry")
    machine = Machine()
    save(dry, step, monkeypatch, machine)
    shutil.rmtree(dry)
    return machine.count


def crash_save(out: Path, step: int, at: int, monkeypatch) -> None:
    with pytest.raises(Crash):
        save(out, step, monkeypatch, Machine(crash_at=at))


def found_step(out: Path) -> int:
    """The step of the checkpoint ``find_checkpoint`` returns, after loading all of it and checking the weights."""
    found = find_checkpoint(out)
    assert found is not None, f"no checkpoint left in {sorted(os.listdir(out))}"
    model, opt = model_and_optimizer(-1.0)
    loaded = load_checkpoint(found, model=model, optimizer=opt)
    for p in model.parameters():
        assert torch.all(p == loaded.step), f"{found}: weights of step {p.flatten()[0]}, state says {loaded.step}"
    return loaded.step


def entries(out: Path) -> list[str]:
    return sorted(os.listdir(out))


def signature(out: Path) -> tuple:
    """The on-disk state up to the names and contents of temporaries (which a later save or start only removes)."""
    sig = []
    for name in entries(out):
        if name.endswith(io_mod.TEMP_SUFFIX):
            sig.append("temporary")
        else:
            files = tuple(entries(out / name))
            state = out / name / "trainer_state.json"
            sig.append((name, files, state.read_text() if state.is_file() else None))
    return tuple(sorted(map(str, sig)))


def test_double_crash_at_every_event_keeps_a_complete_checkpoint(tmp_path, monkeypatch):
    """Save 3 crashes at event i (every i), save 4 at event j (every j), then save 5 succeeds.

    Crash points i that leave the same state on disk (:func:`signature`) lead to the same events
    in save 4, so the j sweep runs once per distinct state; every i is still crashed and checked.
    Likewise the checks after the second crash run once per distinct state it leaves.
    """
    base = tmp_path / "base"
    save(base, 1, monkeypatch)
    save(base, 2, monkeypatch)
    n2 = count_events(base, 3, monkeypatch)
    assert n2 > 20  # writes, fsyncs and renames of three files and a directory
    states: dict[tuple, tuple[Path, int]] = {}
    for i in range(n2):
        first = copy(base, tmp_path / f"i{i}")
        crash_save(first, 3, i, monkeypatch)
        sig = signature(first)
        if sig not in states:
            states[sig] = (copy(first, tmp_path / f"state{len(states)}"), i)  # temporaries and all
        s1 = found_step(first)
        assert s1 in (2, 3), f"crash at event {i}: found step {s1}"
        # find_checkpoint at start-up removed the dead writer's temporaries, never a checkpoint
        assert set(entries(first)) <= {"checkpoint", ".checkpoint.old"}, f"crash at {i}: {entries(first)}"
        shutil.rmtree(first)
    # the crash points lead through every branch: temporaries left, only the aside copy, both copies
    assert len(states) >= 5, sorted(states)
    combos, checked = 0, set()
    for crashed, i in states.values():
        s1 = found_step(copy(crashed, tmp_path / "probe"))
        shutil.rmtree(tmp_path / "probe")
        n3 = count_events(crashed, 4, monkeypatch)
        for j in range(n3):
            second = copy(crashed, tmp_path / f"i{i}-j{j}")
            crash_save(second, 4, j, monkeypatch)
            combos += 1
            key = (s1, signature(second))
            if key in checked:  # the same state as an earlier pair of crashes: the same outcome below
                shutil.rmtree(second)
                continue
            checked.add(key)
            s2 = found_step(second)
            assert s2 in (s1, 4), f"crashes at events {i} then {j}: found step {s2}, expected {s1} or 4"
            save(second, 5, monkeypatch)
            assert found_step(second) == 5
            assert entries(second) == ["checkpoint"], f"crashes at {i}, {j}, then a save: {entries(second)}"
            shutil.rmtree(second)
    assert combos > len(states) * 20 and len(checked) >= 10


def test_a_crash_that_left_only_the_aside_copy_survives_a_second_crash(tmp_path, monkeypatch):
    """The issue's case: a crash between the two renames leaves only .checkpoint.old; the next save
    used to delete it first, so a second crash lost every checkpoint."""
    out = tmp_path / "run"
    save(out, 1, monkeypatch)
    os.replace(out / "checkpoint", out / ".checkpoint.old")
    n = count_events(out, 2, monkeypatch)
    for j in range(n):
        run = tmp_path / f"j{j}"
        shutil.copytree(out, run)
        crash_save(run, 2, j, monkeypatch)
        assert found_step(run) in (1, 2), f"crash at event {j}"


def test_every_file_and_rename_is_durable_before_the_old_copy_goes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save(out, 1, monkeypatch)
    machine = Machine()
    save(out, 2, monkeypatch, machine)
    log = machine.log
    ckpt, aside = str(out / "checkpoint"), str(out / ".checkpoint.old")
    swap_in = next(k for k, (kind, p) in enumerate(log) if kind == "rename" and p.startswith(str(out / ".checkpoint.")))
    tmp = log[swap_in][1]
    assert tmp.endswith(".tmp")
    synced = {p for kind, p in log[:swap_in] if kind == "fsync"}
    for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json"):
        assert f"{tmp}/{name}" in synced, f"{name} not fsynced before the rename"
    assert tmp in synced
    # checkpoint/ went aside (durably) before the new one came in
    aside_at = log.index(("rename", ckpt))
    assert aside_at < swap_in and ("fsync", str(out)) in log[aside_at:swap_in]
    # the new checkpoint/ is durable before the aside copy is touched
    touched = [k for k, (kind, p) in enumerate(log) if k > swap_in and p == aside]
    assert touched and ("fsync", str(out)) in log[swap_in : touched[0]]
    # the trainer state is written last
    data_writes = [Path(p).name for kind, p in log if kind in ("write", "save_file")]
    assert data_writes[-1] == "trainer_state.json"
