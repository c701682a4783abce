"""A DDPM as a model directory: one network, its noise schedule, training and sampling.

Training minimises the simple objective of Ho et al. 2020 (DDPM, eq. 14):

    L_simple = E_{t ~ U{0..T-1}, x0, eps ~ N(0, I)} || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2

(or its x0 / v counterpart, set by ``prediction_type``). Sampling runs either DDPM's ancestral
sampler through all T steps (Algorithm 2) or DDIM's generalised step (Song et al. 2021, eq. 12)
over a sub-sequence of S << T timesteps, with ``eta`` scaling the noise of eq. 16 (eta=0:
deterministic DDIM; eta=1: the DDPM posterior variance). The same trained network serves both:
that is DDIM's point, and what ``notelab reproduce ddim`` measures.

With ``sde`` set ("ve", "vp", "subvp"), the same network is trained by continuous-time denoising
score matching (Song et al. 2021, eq. 7; ``notelab.diffusion.score``) and sampled by the SDE
samplers ("pc", "em", "rd", "ode"; ``notelab.diffusion.samplers``); a DDPM-trained model (sde
"none", linear betas) is the VP SDE's discretisation and takes those samplers and the exact
likelihood too, through its eps-to-score adapter (``score_fn``).

A run directory holds ``config.json`` (a :class:`DiffusionConfig`, model_type "ddpm") and
``model.safetensors`` (the EMA weights), and loads with ``DiffusionModel.from_pretrained(dir)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from notelab.core.checkpoint import PretrainedMixin
from notelab.core.config import config_from_dict, config_to_dict
from notelab.core.denoisers import MLPDenoiser, MLPDenoiserConfig, UNet, UNetConfig
from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.core.runtime import autocast, autocast_dtype, seed_everything
from notelab.diffusion.ddim import sample_ddim
from notelab.diffusion.ddpm import VARIANCE_TYPES, ddpm_loss, sample_ddpm
from notelab.diffusion.likelihood import LikelihoodResult, log_likelihood
from notelab.diffusion.parametrization import PREDICTION_TYPES
from notelab.diffusion.samplers import SDE_SAMPLERS, SampleResult, sample_sde
from notelab.diffusion.schedules import BETA_SCHEDULES, NoiseSchedule, check_timesteps
from notelab.diffusion.score import WEIGHTINGS, dsm_loss, eps_to_score
from notelab.diffusion.sde import SDE, SDE_NAMES, VESDE, VPSDE, Score, SubVPSDE
from notelab.train import fit, plot_history

NETS = {"unet": (UNet, UNetConfig), "mlp": (MLPDenoiser, MLPDenoiserConfig)}
SAMPLERS = ("ddim", "ddpm", *SDE_SAMPLERS)
DISCRETE_SAMPLERS = ("ddim", "ddpm")
LossFn = Callable[[nn.Module, torch.Tensor, "torch.Generator | None"], torch.Tensor]


def default_net_config(sample_shape: tuple[int, ...]) -> dict[str, Any]:
    """A network sized for the data: an MLP for points ``(D,)``, a UNet for images ``(C, H, W)``.

    The UNet gets one more level (one more downsampling) per doubling of the image size above 8,
    so the attention always runs on a 4x4..8x8 map; width grows with the image size.
    """
    if len(sample_shape) == 1:
        return {"dim": sample_shape[0], "hidden": 256, "n_layers": 4, "time_dim": 64}
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise ConfigError(f"sample_shape: expected (D,) or square (C, H, H), got {tuple(sample_shape)}")
    channels, size = sample_shape[0], sample_shape[1]
    if size <= 8:
        base, mults = 32, (1, 2)
    elif size <= 16:
        base, mults = 32, (1, 2, 2)
    elif size <= 32:
        base, mults = 64, (1, 2, 2)
    else:
        base, mults = 64, (1, 2, 2, 2)
    while size % 2 ** (len(mults) - 1):  # each level halves the map: drop levels an odd size cannot take
        mults = mults[:-1]
    return {
        "in_channels": channels,
        "image_size": size,
        "base_channels": base,
        "channel_mults": mults,
        "num_res_blocks": 1 if size <= 8 else 2,
    }


@dataclass
class DiffusionConfig:
    sample_shape: tuple[int, ...] = (1, 8, 8)  # one sample: (C, H, W) for images, (D,) for points
    net: str = "unet"  # "unet" (images) or "mlp" (points), the networks of notelab.core.denoisers
    net_config: dict[str, Any] = field(default_factory=dict)  # fields of UNetConfig / MLPDenoiserConfig
    beta_schedule: str = "linear"  # "linear", "scaled_linear", "cosine" (notelab.diffusion.schedules)
    num_train_timesteps: int = 1000  # T
    beta_start: float = 1e-4  # beta_1 (DDPM's value)
    beta_end: float = 0.02  # beta_T
    prediction_type: str = "epsilon"  # what the network outputs: "epsilon", "sample" (x0) or "v_prediction"
    variance_type: str = "fixed_small"  # DDPM sampler's sigma_t^2: posterior beta_tilde or beta_t
    sde: str = "none"  # "none" (DDPM's discrete loss) or "ve", "vp", "subvp" (continuous score matching)
    sigma_min: float = 0.01  # VE SDE's sigma range; VP / sub-VP take beta_start T .. beta_end T
    sigma_max: float = 50.0
    weighting: str = "eps"  # score matching weight lambda(t): "eps" (s^2) or "likelihood" (g^2)
    importance: bool = False  # draw t with density g^2 / s^2 (weighting "likelihood" only)

    def __post_init__(self) -> None:
        if dataclasses.is_dataclass(self.net_config):
            self.net_config = config_to_dict(self.net_config)
        self.sample_shape = tuple(int(s) for s in self.sample_shape)
        if not self.sample_shape or any(s < 1 for s in self.sample_shape):
            raise ConfigError(f"sample_shape: expected positive sizes, got {self.sample_shape}")
        if self.net not in NETS:
            raise unknown_name("net", self.net, NETS)
        if self.beta_schedule not in BETA_SCHEDULES:
            raise unknown_name("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.prediction_type not in PREDICTION_TYPES:
            raise unknown_name("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.variance_type not in VARIANCE_TYPES:
            raise unknown_name("variance_type", self.variance_type, VARIANCE_TYPES)
        if self.num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps: expected >= 1, got {self.num_train_timesteps}")
        if self.sde not in ("none", *SDE_NAMES):
            raise unknown_name("sde", self.sde, ("none", *SDE_NAMES))
        if self.weighting not in WEIGHTINGS:
            raise unknown_name("weighting", self.weighting, WEIGHTINGS)
        if self.sde != "none" and self.prediction_type != "epsilon":
            raise ConfigError(f"prediction_type: sde {self.sde!r} trains an eps network, got {self.prediction_type!r}")
        if self.importance and self.weighting != "likelihood":
            raise ConfigError("importance: needs weighting 'likelihood', got weighting 'eps'")
        if self.sde in ("vp", "subvp") and self.beta_schedule != "linear":
            raise ConfigError(f"beta_schedule: the {self.sde} SDE has linear betas, got {self.beta_schedule!r}")
        self.build_sde()  # checks sigma_min < sigma_max, positive betas
        # The fields the data fixes are filled from sample_shape and must agree with it when given.
        fixed = _shape_fields(self.net, self.sample_shape)
        for k, v in fixed.items():
            if k in self.net_config and self.net_config[k] != v:
                raise ConfigError(
                    f"net_config.{k}: sample_shape {self.sample_shape} implies {v}, config gives {self.net_config[k]}"
                )
        # Stored in full and in JSON form (tuples as lists), so a config equals its reloaded copy.
        self.net_config = config_to_dict(self.net_config_object({**self.net_config, **fixed}))

    def net_config_object(self, data: dict[str, Any] | None = None) -> Any:
        """``net_config`` as the network's dataclass config (UNetConfig or MLPDenoiserConfig)."""
        config_cls = NETS[self.net][1]
        try:
            return config_from_dict(config_cls, dict(self.net_config if data is None else data))
        except ValueError as e:
            raise ConfigError(f"net_config: {e}") from e

    def build_net(self) -> nn.Module:
        return NETS[self.net][0](self.net_config_object())

    def build_sde(self) -> SDE:
        """The SDE of this model: VE from sigma_min / sigma_max, else VP / sub-VP whose N = T step
        discretisation is the linear schedule beta_start..beta_end (a DDPM model is "vp")."""
        T = self.num_train_timesteps
        if self.sde == "ve":
            return VESDE(N=T, sigma_min=self.sigma_min, sigma_max=self.sigma_max)
        cls = SubVPSDE if self.sde == "subvp" else VPSDE
        return cls(N=T, beta_min=self.beta_start * T, beta_max=self.beta_end * T)

    @classmethod
    def for_shape(cls, sample_shape: tuple[int, ...], **overrides: Any) -> DiffusionConfig:
        """DDPM's defaults (linear betas 1e-4..0.02, T=1000, epsilon) with a network sized for the data.

        ``overrides`` replace fields; a ``net_config`` override updates the default network's fields.
        """
        sample_shape = tuple(sample_shape)
        net = "mlp" if len(sample_shape) == 1 else "unet"
        net_config = {**default_net_config(sample_shape), **dict(overrides.pop("net_config", None) or {})}
        return cls(sample_shape=sample_shape, net=net, net_config=net_config, **overrides)


def _shape_fields(net: str, sample_shape: tuple[int, ...]) -> dict[str, int]:
    if net == "mlp":
        if len(sample_shape) != 1:
            raise ConfigError(f"net 'mlp': expected sample_shape (D,), got {sample_shape}")
        return {"dim": sample_shape[0]}
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise ConfigError(f"net 'unet': expected a square sample_shape (C, H, H), got {sample_shape}")
    return {"in_channels": sample_shape[0], "image_size": sample_shape[1]}


class DiffusionModel(PretrainedMixin, nn.Module):
    """A denoising network ``f(x_t, t)`` together with the noise schedule it was trained under.

    ``model(x, t)`` is the network's output (eps, x0 or v per ``config.prediction_type``); the
    schedule is derived from the config and holds no learned state, so it is not in the weights.
    """

    config_class = DiffusionConfig
    model_type = "ddpm"

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        self.config = config
        self.net = config.build_net()
        # Kept outside the module tree: the schedule is a pure function of the config.
        self.__dict__["schedule"] = NoiseSchedule.from_name(
            config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network at ``(x, t)``; ``t`` on DDPM's timestep scale: integer timesteps in [0, T), or
        an SDE model's time labels t (N - 1) / T (floats in [0, T), ``score.time_label``)."""
        check_time_input(t, self.config.num_train_timesteps)
        return self.net(x, t)

    def loss(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM's simple loss (eq. 14), or continuous score matching when ``config.sde`` is set."""
        return model_loss(self.config, self.schedule)(self, x0, generator)

    @property
    def sde(self) -> SDE:
        return self.config.build_sde()

    def score_fn(self, net: nn.Module | None = None) -> Score:
        """score(x, t) = -eps(x, t (T - 1)) / s(t) of this model's SDE (VP for a DDPM model)."""
        c = self.config
        if c.sde == "none" and c.beta_schedule != "linear":
            raise ConfigError(f"score_fn: a DDPM model is a VP SDE only with linear betas, got {c.beta_schedule!r}")
        return eps_to_score(net or self.net, self.sde, c.prediction_type)

    @torch.no_grad()
    def sample_sde(
        self,
        n: int,
        sampler: str = "pc",
        steps: int = 1000,
        generator: torch.Generator | None = None,
        precision: str = "auto",
        compile: bool | str = "auto",
        x_T: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SampleResult:
        """(samples, NFE) by an SDE sampler (``notelab.diffusion.samplers.sample_sde``; kwargs: snr,
        n_corrector, eps, denoise, method, rtol, atol, progress)."""
        if n < 1:
            raise ConfigError(f"n: expected at least 1 sample, got {n}")
        amp_dtype, compiled = sampling_setup(self.device, precision, compile)
        was_training = self.training
        self.eval()
        try:
            with autocast(self.device, amp_dtype):
                res = sample_sde(
                    self.score_fn(self.denoiser(compiled)),
                    self.sde,
                    (n, *self.config.sample_shape),
                    sampler,
                    steps,
                    generator,
                    x_T=x_T,
                    device=self.device,
                    **kwargs,
                )
            res.x = res.x.float()
            return res
        finally:
            self.train(was_training)

    def log_likelihood(self, x: torch.Tensor, **kwargs: Any) -> LikelihoodResult:
        """log p_0(x) in nats per sample by the probability-flow ODE, its state in x's dtype (no
        autocast): float64 ``x`` keeps the solver's error far below the network's, which runs in
        its own dtype."""
        was_training = self.training
        self.eval()
        dtype = next(self.parameters()).dtype

        def net(y: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            return self.net(y.to(dtype), label.to(dtype)).to(y.dtype)

        try:
            return log_likelihood(self.score_fn(net), self.sde, x.to(self.device), **kwargs)
        finally:
            self.train(was_training)

    def check_steps(self, sampler: str, steps: int) -> None:
        """Raise :class:`ConfigError` unless ``sampler`` is known and ``1 <= steps <= T``."""
        if sampler not in SAMPLERS:
            raise unknown_name("sampler", sampler, SAMPLERS)
        if sampler in DISCRETE_SAMPLERS and self.config.sde in ("ve", "subvp"):
            raise ConfigError(f"sampler: {sampler!r} needs a DDPM / VP model, this one is {self.config.sde!r}")
        T = self.config.num_train_timesteps
        if not 1 <= int(steps) <= T:
            raise ConfigError(f"steps: expected 1..{T} (the model's training timesteps), got {steps}")

    def denoiser(self, compile: bool = False) -> nn.Module:
        """The network, ``torch.compile``d when asked (compiled once per model and reused by later calls)."""
        if not compile:
            return self.net
        compiled = self.__dict__.get("_compiled_net")
        if compiled is None:
            # Kept outside the module tree, like the schedule: state_dict and to() see only self.net.
            compiled = self.__dict__["_compiled_net"] = torch.compile(self.net)
        return compiled

    @torch.no_grad()
    def sample(
        self,
        n: int,
        sampler: str = "ddim",
        steps: int = 50,
        eta: float = 0.0,
        spacing: str = "leading",
        generator: torch.Generator | None = None,
        progress: bool = False,
        x_T: torch.Tensor | None = None,
        clip_sample: bool = False,
        precision: str = "auto",
        compile: bool | str = "auto",
    ) -> torch.Tensor:
        """Draw ``n`` samples of shape ``(n, *sample_shape)`` from N(0, I) noise ``x_T``.

        ``sampler="ddim"`` takes ``steps`` network calls (DDIM eq. 12 with ``eta``, timesteps by
        ``spacing``); ``sampler="ddpm"`` always takes all T ancestral steps and ignores ``steps``,
        ``eta`` and ``spacing``. Noise comes from ``generator`` when given (reproducible).

        ``precision``: the network's autocast dtype ("auto": bf16 on CUDA, fp32 on CPU); the
        sampler's own arithmetic and the returned samples stay float32. ``compile``: run the
        network through ``torch.compile`` ("auto": on CUDA, where the fused kernels pay for the
        one-off compile within a few batches; the first call on a model takes that compile time).
        See :func:`sampling_setup`.
        """
        if sampler in SDE_SAMPLERS:
            return self.sample_sde(n, sampler, steps, generator, precision, compile, x_T, progress=progress).x
        self.check_steps(sampler, steps if sampler == "ddim" else self.config.num_train_timesteps)
        if n < 1:
            raise ConfigError(f"n: expected at least 1 sample, got {n}")
        amp_dtype, compiled = sampling_setup(self.device, precision, compile)
        shape = (n, *self.config.sample_shape)
        if x_T is None:
            # Draw on the generator's device, then move: same noise on CPU and GPU for one seed.
            gen_device = generator.device if generator is not None else self.device
            x_T = torch.randn(shape, generator=generator, device=gen_device).to(self.device)
        elif tuple(x_T.shape) != shape:
            raise ShapeError(f"x_T: expected shape {shape}, got {tuple(x_T.shape)}")
        was_training = self.training
        self.eval()
        net = self.denoiser(compiled)
        try:
            with autocast(self.device, amp_dtype):
                if sampler == "ddpm":
                    x = sample_ddpm(
                        net,
                        x_T,
                        self.schedule,
                        variance_type=self.config.variance_type,
                        prediction_type=self.config.prediction_type,
                        clip_sample=clip_sample,
                        generator=generator,
                        progress=progress,
                    )
                else:
                    x = sample_ddim(
                        net,
                        x_T,
                        self.schedule,
                        steps,
                        eta=eta,
                        spacing=spacing,
                        prediction_type=self.config.prediction_type,
                        clip_sample=clip_sample,
                        generator=generator,
                        progress=progress,
                    )
            return x
        finally:
            self.train(was_training)


def sampling_setup(
    device: torch.device, precision: str = "auto", compile: bool | str = "auto"
) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for float32, whether to compile the network) for sampling on ``device``.

    ``"auto"`` precision is bf16 on CUDA and float32 on CPU (``notelab.core.runtime.autocast_dtype``);
    ``"auto"`` compile is on for CUDA only: on the CPU the compile time outweighs what it saves.
    """
    if not (isinstance(compile, bool) or compile == "auto"):
        raise ConfigError(f"compile: expected 'auto', True or False, got {compile!r}")
    return autocast_dtype(device, precision), device.type == "cuda" if compile == "auto" else compile


def check_time_input(t: torch.Tensor | int | float, num_train_timesteps: int) -> None:
    """Raise unless ``t`` is on the network's time scale, [0, T), where checking it is free.

    Checked: Python numbers and CPU tensors (a min / max over B values). Not checked: a CUDA tensor,
    whose min / max would be a host sync on every network call, stalling the queue of kernels that
    training and sampling keep ahead of the host (their own t is in range by construction:
    ``torch.randint(0, T)``, ``time_label`` of t in [eps, T], timestep lists checked once at the
    sampler's entry by ``check_timesteps``); and a tensor being traced by ``torch.compile``, where a
    value-dependent branch would break the graph. The dtype is metadata, checked everywhere.
    """
    T = num_train_timesteps
    if isinstance(t, torch.Tensor):
        if t.dtype == torch.bool or t.dtype.is_complex:
            raise ShapeError(
                f"DiffusionModel: expected integer or float time inputs t in [0, {T}), got dtype {t.dtype}"
            )
        if not t.dtype.is_floating_point:  # integer timesteps: the schedules' own check (one line, names T)
            if t.device.type == "cpu" and not torch.compiler.is_compiling():
                check_timesteps(t, T, name="DiffusionModel: t")
            return
        if t.device.type != "cpu" or t.numel() == 0 or torch.compiler.is_compiling():
            return
        lo, hi = float(t.min()), float(t.max())
    elif isinstance(t, float):
        lo = hi = t
    else:
        check_timesteps(t, T, name="DiffusionModel: t")
        return
    if not (lo >= 0 and hi < T):  # NaN fails too
        raise ShapeError(
            f"DiffusionModel: expected time inputs t in [0, {T}) (DDPM's timestep scale), got {lo:g}..{hi:g}"
        )


def model_loss(config: DiffusionConfig, schedule: NoiseSchedule) -> LossFn:
    """loss_fn(net, x0, generator) for ``fit``: DDPM's eq. 14, or continuous DSM under ``config.sde``.

    ``net`` may be a DDP / compiled wrapper of the model, so the schedule / SDE come from the closure.
    """
    if config.sde == "none":
        prediction_type = config.prediction_type

        def ddpm(net: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
            return ddpm_loss(net, x0, schedule, generator=generator, prediction_type=prediction_type)

        return ddpm
    sde, weighting, importance = config.build_sde(), config.weighting, config.importance

    def dsm(net: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return dsm_loss(net, x0, sde, generator, weighting, importance)

    return dsm


def train_diffusion(
    dataset: Any,
    out_dir: str | os.PathLike,
    train_config: Any,
    diffusion_config: DiffusionConfig | None = None,
    callbacks: tuple = (),
) -> DiffusionModel:
    """Train a DDPM on ``dataset`` (a ``notelab.data`` ``ArrayDataset``) with ``notelab.train.fit``.

    Writes ``out_dir/config.json`` + ``out_dir/model.safetensors`` (the EMA weights, or the last
    weights when EMA is off), ``out_dir/loss.png``, and fit's own ``log.jsonl`` and resumable
    ``checkpoint/``. Returns the saved model, in eval mode.
    """
    shape = tuple(dataset.sample_shape)
    config = diffusion_config or DiffusionConfig.for_shape(shape)
    if tuple(config.sample_shape) != shape:
        raise ConfigError(f"sample_shape: the data has {shape}, the diffusion config says {config.sample_shape}")
    out_dir = Path(out_dir)
    seed_everything(train_config.seed)  # the initial weights are the run's: same seed, same model
    model = DiffusionModel(config)
    loss_fn = model_loss(config, model.schedule)
    # The samples as one tensor: fit keeps a small data set on the device whole.
    data = torch.as_tensor(dataset.x, dtype=torch.float32)
    train_config = dataclasses.replace(train_config, out_dir=str(out_dir))
    result = fit(model, loss_fn, data, train_config, callbacks=callbacks)
    final = result.ema_model if result.ema_model is not None else result.model
    saved = DiffusionModel(config)
    saved.load_state_dict({k: v.detach().cpu() for k, v in final.state_dict().items()})
    saved.save_pretrained(out_dir)
    if (out_dir / "log.jsonl").is_file():
        plot_history(out_dir / "log.jsonl", out_dir / "loss.png")
    return saved.eval()
