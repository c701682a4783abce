"""The `sde` claim: its decision rule, and a miniature run end to end (tables, figures, checks, verdict)."""

from __future__ import annotations

import dataclasses

from notelab.reproduce import CLAIMS, rules
from notelab.reproduce import score_sde as claim
from notelab.reproduce.base import VERDICTS, ClaimResult, quiet


def test_registered():
    assert CLAIMS["sde"] == "notelab.reproduce.score_sde"


def test_rule_reads_the_paired_gap():
    assert claim.decide([0.2, 0.3, 0.25, 0.1, 0.15]).verdict == "holds"
    assert claim.decide([-0.2, -0.3, -0.25, -0.1]).verdict == "does not hold"
    assert claim.decide([0.5, -0.4, 0.3, -0.5]).verdict == "inconclusive"
    assert rules.claim_verdict([claim.decide([0.2, 0.3, 0.25])]) == "holds"


def test_miniature_run(tmp_path, monkeypatch):
    tiny = dataclasses.replace(
        claim.QUICK, train_steps=3, batch_size=32, hidden=16, n_layers=1, n_test=6, bound_draws=1,
        n_samples=32, rtol=1e-3, samplers=(("em", 5), ("ode", 0)),
    )  # fmt: skip
    monkeypatch.setattr(claim, "QUICK", tiny)
    result = claim.run(tmp_path, quick=True)
    assert isinstance(result, ClaimResult) and result.verdict in VERDICTS
    assert len(result.checks) == 1 and len(result.checks[0].values) == 6
    assert [len(t.rows) for t in result.tables] == [4, 4]  # 4 NLL rows; 2 models x 2 samplers
    assert (tmp_path / "trajectories.png").is_file()
    assert result.settings["bound"] > 0 and set(result.settings["ode_nll"]) == {"ddpm", "subvp"}


def test_miniature_digits_section(tmp_path):
    tiny = dataclasses.replace(
        claim.QUICK, samplers=(("em", 3),), digits_steps=2, digits_test=3, digits_samples=8, rtol=1e-2,
        digits_channels=8, digits_timesteps=100,
    )  # fmt: skip
    section = claim.digits_section(tiny, 0, tmp_path, quiet())
    assert len(section.checks) == 1 and len(section.checks[0].values) == 3
    assert section.checks[0].name.startswith("digits")
    assert [len(t.rows) for t in section.tables] == [2, 1]
    bpd = section.values["digits_bpd"]
    assert bpd["bound"] > 0 and bpd["ode"] > 0
