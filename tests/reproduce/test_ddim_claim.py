"""The `ddim` claim: its verdict rule, and a miniature run end to end (tables, figures, verdict)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from notelab.reproduce import ddim as claim
from notelab.reproduce.base import VERDICTS, ClaimResult

RULE = claim.Settings(
    train_steps=1, batch_size=1, lr=1e-3, warmup_steps=0, ema_decay=0.9, base_channels=8, num_res_blocks=1,
    n_samples=1, ddpm_seeds=3,
)  # fmt: skip


def _ddim(fd_by_steps: dict[int, float], seconds_by_steps: dict[int, float]) -> dict:
    out = {}
    for eta in (0.0, 1.0):
        for S, fd in fd_by_steps.items():
            out[(eta, S)] = {"fd": fd + eta, "seconds": seconds_by_steps[S]}
    return out


def test_spread_threshold_is_mean_plus_k_sample_std():
    assert claim.spread_threshold([1.0, 2.0, 3.0], k=2.0) == pytest.approx(2.0 + 2.0 * 1.0)


def test_holds_when_ddim_eta0_is_within_ddpm_spread_at_10x_less_time():
    ddpm_fds, ddpm_secs = [1.0, 1.2, 0.8], [100.0, 100.0, 100.0]
    ddim = _ddim({10: 9.0, 20: 1.5, 50: 1.1, 100: 1.0}, {10: 1.0, 20: 2.0, 50: 5.0, 100: 10.0})
    verdict, passing = claim.judge(ddim, ddpm_fds, ddpm_secs, RULE)
    assert verdict == "holds" and passing == [50, 100]
    assert ddim[(0.0, 50)]["speedup"] == pytest.approx(20.0) and ddim[(0.0, 20)]["within"] is False


def test_does_not_hold_when_only_s10_is_close_or_the_speedup_is_too_small():
    ddpm_fds, ddpm_secs = [1.0, 1.2, 0.8], [100.0, 100.0, 100.0]
    # S=10 is outside 20..100 however good it is; S=100 is close but only 5x faster
    ddim = _ddim({10: 1.0, 20: 5.0, 50: 5.0, 100: 1.0}, {10: 1.0, 20: 2.0, 50: 5.0, 100: 20.0})
    assert claim.judge(ddim, ddpm_fds, ddpm_secs, RULE) == ("does not hold", [])


def test_inconclusive_when_ddpm_fd_is_not_finite():
    ddim = _ddim({20: 1.0}, {20: 1.0})
    assert claim.judge(ddim, [1.0, float("nan")], [100.0, 100.0], RULE)[0] == "inconclusive"


def test_miniature_run_writes_table1_layout_figures_and_a_verdict(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny = dataclasses.replace(
        RULE, train_steps=8, batch_size=32, n_samples=16, ddpm_seeds=2, ddim_steps=(10, 20), num_train_timesteps=100
    )
    monkeypatch.setattr(claim, "QUICK", tiny)
    try:
        result = claim.run(tmp_path, quick=True, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert isinstance(result, ClaimResult) and result.name == "ddim" and result.verdict in VERDICTS
    fd_table, time_table, seed_table = result.tables
    assert fd_table.columns == ["", "S = 10", "S = 20", "T = 100"]
    assert [r[0] for r in fd_table.rows] == ["DDIM eta = 0", "DDIM eta = 1", "DDPM (2 seeds)"]
    assert "+-" in fd_table.rows[-1][-1] and fd_table.rows[0][-1] == "-"
    assert "real digits score" in fd_table.note and result.settings["data_fd"] >= 0
    assert len(time_table.rows) == 3 and len(seed_table.rows) == 2
    for fig in result.figures:
        assert (tmp_path / fig.path).is_file(), fig.path
    assert any(f.path == "quality_vs_time.png" for f in result.figures)
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "model.safetensors").is_file()
    assert set(result.settings["ddim"]) == {"eta=0,S=10", "eta=0,S=20", "eta=1,S=10", "eta=1,S=20"}
    assert result.seconds > 0
