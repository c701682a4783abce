"""Flow matching paths against torchcfm (Tong et al.'s library) on the same x0, x1, t and noise."""

import pytest
import torch

from notelab.flows.matching import LinearPath, ot_pairs

cfm = pytest.importorskip("torchcfm.conditional_flow_matching")


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_linear_path_equals_conditional_flow_matcher(sigma):
    g = torch.Generator().manual_seed(0)
    x0, x1, eps = (torch.randn(32, 3, generator=g) for _ in range(3))
    t = torch.rand(32, generator=g)
    theirs = cfm.ConditionalFlowMatcher(sigma=sigma)
    xt_ref = theirs.sample_xt(x0, x1, t, eps)
    ut_ref = theirs.compute_conditional_flow(x0, x1, t, xt_ref)
    path = LinearPath(sigma)
    torch.testing.assert_close(path.sample(x0, x1, t, eps), xt_ref)
    torch.testing.assert_close(path.velocity(x0, x1, t, eps), ut_ref)


def test_ot_pairing_matches_the_exact_ot_plan():
    """torchcfm's exact OT plan (POT's emd) on equal uniform batches is a permutation: the same pairs."""
    from torchcfm.optimal_transport import OTPlanSampler

    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    plan = OTPlanSampler(method="exact").get_map(x0, x1)
    i, j = plan.nonzero()
    ref = torch.empty_like(x0)
    ref[torch.as_tensor(j)] = x0[torch.as_tensor(i)]
    paired, _ = ot_pairs(x0, x1)
    torch.testing.assert_close(paired, ref)
