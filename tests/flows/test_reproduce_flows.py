"""The flows claim end to end on a micro budget (every part, the full run's part 4 included):
it returns its tables, figures and checks, and the verdict follows the rules."""

import dataclasses

from notelab.flows.continuous import Solver
from notelab.reproduce import flows as claim
from notelab.reproduce import rules

MICRO = dataclasses.replace(
    claim.QUICK,
    models=("nice", "realnvp", "cnf", "fm", "rf"),
    seeds=2,
    reflow_seeds=2,
    steps=4,
    cnf_steps=2,
    hidden=8,
    depth=1,
    batch_size=32,
    n_train=64,
    n_test=64,
    grid=21,
    ll_solver=Solver("rk4", steps=2),
    reflow_pairs=32,
    digits_steps=2,
    inpaint_steps=2,
    side_steps=2,
    side_nfe=(1, 10),
    side_hidden=8,
    side_depth=1,
)


def test_every_part_runs_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(claim, "FULL", MICRO)
    result = claim.run(tmp_path, quick=False, seed=0)
    assert result.verdict == rules.claim_verdict(result.checks)
    for name in ("densities.png", "nice_digits_samples.png", "nice_digits_inpainting.png", "side_by_side.png"):
        assert (tmp_path / name).is_file(), name
    groups = {c.group for c in result.checks}
    assert {claim.NORMALISED, claim.AFFINE, claim.REGRESSION, claim.REFLOW} <= groups
    assert len(result.settings["log_likelihood"]["cnf"]) == 2
    assert result.settings["side_parameters"]["ddpm"] == result.settings["side_parameters"]["fm"]
