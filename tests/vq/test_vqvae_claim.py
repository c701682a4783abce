"""The `vqvae` claim: its decision rule, and a miniature run end to end (tables, figures, checks, verdict)."""

from __future__ import annotations

import dataclasses
import math

import torch

from notelab.reproduce import rules
from notelab.reproduce import vqvae as claim
from notelab.reproduce.base import VERDICTS, ClaimResult
from notelab.vq import VQVAE, VQVAEConfig

GROUP = "restart keeps the codebook in use (some codebook kind)"


def test_holds_when_all_three_groups_hold():
    gaps = {"loss": [20.0, 25.0, 18.0], "ema": [10.0, 12.0, 9.0]}
    assert rules.claim_verdict(claim.decide([0.2, 0.22, 0.21], gaps, [3.1, 3.2, 3.15], 32)) == "holds"
    # one codebook kind collapsing without restart is enough: the EMA need not
    gaps = {"loss": [57.0, 59.0, 59.0], "ema": [0.0, 0.0, 0.0]}
    assert rules.claim_verdict(claim.decide([0.2, 0.22, 0.21], gaps, [3.1, 3.2, 3.15], 32)) == "holds"


def test_does_not_hold_without_collapse_to_cure_or_with_a_uniform_prior():
    gaps = {"loss": [20.0, 25.0, 18.0], "ema": [10.0, 12.0, 9.0]}
    no_collapse = claim.decide([0.2, 0.22, 0.21], {"loss": [-1.0, -2.0, -1.5], "ema": [-1.0, -1.2, -1.1]}, [3.1], 32)
    assert rules.group_verdicts(no_collapse)[GROUP] == "does not hold"
    uniform = claim.decide([0.2, 0.22, 0.21], gaps, [5.0, 4.99, 5.01], 32)
    assert rules.claim_verdict(uniform) == "does not hold"
    noisy = claim.decide([0.1, 0.9, 0.5], gaps, [3.1, 3.2, 3.15], 32)
    assert rules.claim_verdict(noisy) == "inconclusive"


def test_code_patches_average_the_patches_under_each_code():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(hidden=8, res_blocks=1, code_dim=4, codebook_size=8)).eval()
    x = torch.rand(5, 1, 8, 8)
    patches = claim.code_patches(model, x)
    codes = model.encode(x)
    k = int(codes[2, 1, 3])
    want = torch.stack(
        [x[b, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] for b in range(5) for i in range(4) for j in range(4)
         if int(codes[b, i, j]) == k]
    ).mean(0)  # fmt: skip
    torch.testing.assert_close(patches[k], want)


def test_miniature_run_end_to_end(tmp_path, monkeypatch):
    tiny = dataclasses.replace(
        claim.QUICK, steps=4, hidden=8, code_dim=4, codebook_size=8, prior_steps=4, prior_dim=16, seeds=2, n_samples=4
    )
    monkeypatch.setattr(claim, "QUICK", tiny)
    result = claim.run(tmp_path, quick=True, seed=0)
    assert isinstance(result, ClaimResult) and result.verdict in VERDICTS
    assert {c.group for c in result.checks} == {"reconstruction", GROUP, "prior"}
    assert [len(c.values) for c in result.checks if c.group == GROUP] == [2, 2]  # 2 seeds, per codebook kind
    assert all(math.isfinite(v) for c in result.checks for v in c.values)
    for fig in result.figures:
        assert (tmp_path / fig.path).is_file(), fig.path
    assert len(result.tables[0].rows) == 4
