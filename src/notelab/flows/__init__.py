"""Normalizing flows: NICE and RealNVP coupling flows, continuous normalizing flows, flow matching
and rectified flow."""

from notelab.flows.bijections import (
    ActNorm,
    Additive,
    Affine,
    Bijection,
    Compose,
    Coupling,
    DiagonalScaling,
    Permutation,
    Transform,
    alternating_mask,
    half_mask,
    random_permutation,
    reverse,
)
from notelab.flows.coupling import CouplingFlow, CouplingFlowConfig, Flow
from notelab.flows.dequantize import dequantize, nll_loss
from notelab.flows.priors import StandardLogistic, StandardNormal

__all__ = [
    "ActNorm",
    "Additive",
    "Affine",
    "Bijection",
    "Compose",
    "Coupling",
    "CouplingFlow",
    "CouplingFlowConfig",
    "DiagonalScaling",
    "Flow",
    "Permutation",
    "StandardLogistic",
    "StandardNormal",
    "Transform",
    "alternating_mask",
    "dequantize",
    "half_mask",
    "nll_loss",
    "random_permutation",
    "reverse",
]
