"""The `ddim` claim: its decision rule, and a miniature run end to end (tables, figures, checks, verdict)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from notelab.reproduce import ddim as claim
from notelab.reproduce import rules
from notelab.reproduce.base import VERDICTS, ClaimResult

RULE = claim.Settings(
    train_steps=1, batch_size=1, lr=1e-3, warmup_steps=0, ema_decay=0.9, base_channels=8, num_res_blocks=1,
    n_samples=1, ddpm_seeds=4, ddim_steps=(10, 20, 50, 100),
)  # fmt: skip


def _measured(ddpm: list[float], gap: dict[int, list[float]], speed: dict[int, float]) -> tuple[dict, dict]:
    """Per-seed FDs (DDIM = DDPM * (1 + gap)) and seconds (DDPM 100 s, DDIM 100 / speed, a little noise)."""
    fds, secs = {"ddpm": ddpm}, {"ddpm": [100.0 + k for k in range(len(ddpm))]}
    for S in (10, 20, 50, 100):
        fds[f"ddim eta=0 S={S}"] = [d * (1 + g) for d, g in zip(ddpm, gap.get(S, [5.0] * len(ddpm)))]
        secs[f"ddim eta=0 S={S}"] = [(100.0 + k) / speed.get(S, 1.0) * (1 + 0.01 * k) for k in range(len(ddpm))]
    return fds, secs


def test_paper_gap_is_table1_over_ddpm():
    assert claim.paper_gap(20) == pytest.approx(6.84 / 3.17 - 1)
    assert claim.paper_gap(100) == pytest.approx(4.16 / 3.17 - 1)
    assert claim.paper_gap(30) is None


def test_holds_when_some_s_is_as_close_as_the_paper_and_10x_faster():
    ddpm = [24.0, 30.0, 20.0, 27.0]
    # S=50 within +20..30% (paper: +47%), 20x faster: holds; S=20 worse than the paper's +116%
    fds, secs = _measured(ddpm, {20: [1.5, 1.6, 1.4, 1.7], 50: [0.2, 0.25, 0.3, 0.22]}, {20: 50, 50: 20, 100: 10})
    checks = claim.decide(fds, secs, RULE)
    assert {c.option for c in checks} == {"S=20", "S=50", "S=100"}  # S=10 is outside 20..100
    by = {c.name: c.verdict for c in checks}
    assert by["S=50: FD gap over DDPM-1000"] == "holds" and by["S=50: wall-time speed-up"] == "holds"
    assert by["S=20: FD gap over DDPM-1000"] == "does not hold"
    assert rules.claim_verdict(checks) == "holds"


def test_inconclusive_when_the_seeds_disagree_the_old_wide_band_case():
    # issue 9: DDIM 36.7 vs DDPM 24.7 "held" inside a 3-seed band; paired per seed the gap at S=50
    # (+10% .. +90% around the paper's +47%) cannot be decided
    ddpm = [24.7, 16.0, 33.0]
    fds, secs = _measured(ddpm, {50: [0.1, 0.9, 0.5]}, {20: 50, 50: 20, 100: 10})
    assert rules.claim_verdict(claim.decide(fds, secs, RULE)) == "inconclusive"


def test_does_not_hold_when_every_s_is_far_or_slow():
    ddpm = [24.0, 30.0, 20.0, 27.0]
    fds, secs = _measured(ddpm, {S: [3.0, 3.2, 2.9, 3.1] for S in (20, 50, 100)}, {20: 50, 50: 20, 100: 10})
    assert rules.claim_verdict(claim.decide(fds, secs, RULE)) == "does not hold"
    # close enough at S=100 but only ~5x faster there: that option fails on speed
    fds, secs = _measured(ddpm, {100: [0.0, 0.01, 0.02, 0.0]}, {20: 50, 50: 20, 100: 5})
    checks = claim.decide(fds, secs, RULE)
    assert {c.name: c.verdict for c in checks}["S=100: wall-time speed-up"] == "does not hold"


def test_miniature_run_writes_table1_layout_figures_checks_and_a_verdict(tmp_path, monkeypatch):
    tiny = dataclasses.replace(
        RULE, train_steps=8, batch_size=32, n_samples=16, ddpm_seeds=2, ddim_steps=(10, 20), num_train_timesteps=100
    )
    monkeypatch.setattr(claim, "QUICK", tiny)
    threads = torch.get_num_threads()
    result = claim.run(tmp_path, quick=True, seed=0)
    assert torch.get_num_threads() == threads  # the quick run's one thread is restored
    assert isinstance(result, ClaimResult) and result.name == "ddim" and result.verdict in VERDICTS
    fd_table, time_table, seed_table = result.tables
    assert fd_table.columns == ["", "S = 10", "S = 20", "T = 100"]
    assert [r[0] for r in fd_table.rows] == ["DDIM eta = 0", "DDIM eta = 1", "DDPM (2 noise seeds)"]
    assert "+-" in fd_table.rows[-1][-1] and fd_table.rows[0][-1] == "-"
    assert "real-vs-real reference" in fd_table.note.lower() and "floor" not in fd_table.note.replace("not a floor", "")
    assert len(time_table.rows) == 3 and len(seed_table.rows) == 2
    for fig in result.figures:
        assert (tmp_path / fig.path).is_file(), fig.path
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "model.safetensors").is_file()
    assert [c.option for c in result.checks] == ["S=20", "S=20"] and all(len(c.values) == 2 for c in result.checks)
    assert {p.quantity for p in result.paper} >= {"FD, DDIM eta=0 at S=20 (relative to DDPM-1000)"}
    assert set(result.settings["fds"]) == {"ddpm", "ddim eta=0 S=10", "ddim eta=0 S=20", "ddim eta=1 S=10",
                                           "ddim eta=1 S=20"}  # fmt: skip
    assert result.seconds > 0 and set(result.part_seconds) == {"train the DDPM (8 steps)",
                                                               "sample: 2 noise seeds x (DDPM-100 + DDIM)"}  # fmt: skip
