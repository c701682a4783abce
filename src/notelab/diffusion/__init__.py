"""DDPM / DDIM: beta schedules, parametrisations, the simple loss and the DDPM / DDIM samplers;
score SDEs (VE, VP, sub-VP): score matching, SDE / ODE samplers and exact likelihoods."""
# ruff: noqa: F401  (re-exports: the public API of the family is this list of imports)

from notelab.diffusion.ddim import (
    TIMESTEP_SPACINGS,
    ddim_invert,
    ddim_reconstruct,
    ddim_sigma,
    ddim_step,
    ddim_timesteps,
    sample_ddim,
    slerp,
)
from notelab.diffusion.ddpm import (
    VARIANCE_TYPES,
    call_model,
    ddpm_loss,
    ddpm_step,
    posterior_coefficients,
    posterior_mean_variance,
    q_sample,
    run_chain,
    sample_ddpm,
)
from notelab.diffusion.likelihood import LikelihoodResult, log_likelihood
from notelab.diffusion.parametrization import (
    PREDICTION_TYPES,
    check_prediction_type,
    clip_or_threshold,
    dynamic_threshold,
    eps_from_x0,
    model_target,
    predict_x0_eps,
    score_from_eps,
    v_from_x0_eps,
    x0_eps_from_v,
    x0_from_eps,
)
from notelab.diffusion.pipeline import DiffusionConfig, DiffusionModel, default_net_config, train_diffusion
from notelab.diffusion.samplers import SDE_SAMPLERS, SampleResult, sample_ode, sample_sde
from notelab.diffusion.schedules import BETA_SCHEDULES, NoiseSchedule
from notelab.diffusion.score import dsm_loss, eps_to_score
from notelab.diffusion.sde import SDE, SDE_NAMES, SDES, VESDE, VPSDE, ReverseSDE, SubVPSDE
