"""Normalizing flows: NICE and RealNVP coupling flows, continuous normalizing flows (FFJORD-style),
flow matching and rectified flow.

- :mod:`~notelab.flows.bijections`: the bijection interface (``forward -> (y, ladj)``, ``inverse``),
  couplings with an injected elementwise law (:class:`Additive` NICE, :class:`Affine` RealNVP),
  NICE's diagonal scaling, ActNorm, permutations and masks; for images RealNVP's checkerboard /
  channel masks, conv conditioner, squeeze and multi-scale factor-out.
- :mod:`~notelab.flows.coupling`: :class:`Flow` (base density + bijection) and :class:`CouplingFlow`.
- :mod:`~notelab.flows.continuous`: :class:`ContinuousFlow`, a vector field with exact or Hutchinson
  log-likelihood through ``notelab.core.integrate``.
- :mod:`~notelab.flows.matching`: probability paths, the conditional flow matching loss, minibatch
  OT pairing, reflow.
- :mod:`~notelab.flows.train`: one interface (``nice``, ``realnvp``, ``cnf``, ``fm``, ``rf``) for
  training through ``notelab.train.fit``, scoring (bits/dim) and sampling.
"""

from notelab.flows.bijections import (
    ActNorm,
    Additive,
    Affine,
    Bijection,
    Compose,
    ConvNet,
    Coupling,
    DiagonalScaling,
    MultiScale,
    Permutation,
    Squeeze,
    Transform,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
    half_mask,
    random_permutation,
    resnet,
    reverse,
)
from notelab.flows.continuous import ContinuousFlow, ContinuousFlowConfig, Solver
from notelab.flows.coupling import CouplingFlow, CouplingFlowConfig, Flow
from notelab.flows.dequantize import dequantize, nll_loss
from notelab.flows.inpaint import inpaint
from notelab.flows.matching import (
    FlowMatchingLoss,
    LinearPath,
    OTPath,
    VPPath,
    independent,
    ot_pairs,
    reflow_pairs,
    straightness,
)
from notelab.flows.priors import StandardLogistic, StandardNormal
from notelab.flows.train import FlowSpec, draw, evaluate, load_flow, log_likelihood, train_flow

__all__ = [
    "ActNorm",
    "Additive",
    "Affine",
    "Bijection",
    "Compose",
    "ConvNet",
    "ContinuousFlow",
    "ContinuousFlowConfig",
    "Coupling",
    "CouplingFlow",
    "CouplingFlowConfig",
    "DiagonalScaling",
    "Flow",
    "FlowMatchingLoss",
    "FlowSpec",
    "LinearPath",
    "MultiScale",
    "OTPath",
    "Permutation",
    "Solver",
    "Squeeze",
    "StandardLogistic",
    "StandardNormal",
    "Transform",
    "VPPath",
    "alternating_mask",
    "channel_mask",
    "checkerboard_mask",
    "dequantize",
    "draw",
    "evaluate",
    "half_mask",
    "independent",
    "inpaint",
    "load_flow",
    "log_likelihood",
    "nll_loss",
    "ot_pairs",
    "random_permutation",
    "reflow_pairs",
    "resnet",
    "reverse",
    "straightness",
    "train_flow",
]
