"""Beta schedules of the discrete-time diffusion forward process.

The forward process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 2 and 4):

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    q(x_t | x_0)     = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),
    alpha_t = 1 - beta_t,   alpha_bar_t = prod_{s <= t} alpha_s.

Timesteps are 0-indexed, t in {0, ..., T-1} (the paper's t = 1..T), as in diffusers, so that a
checkpoint trained here and a diffusers scheduler agree on what ``t`` means.

Schedules (names as diffusers' ``beta_schedule``):

- ``linear``: beta_t linear from beta_start to beta_end (Ho et al. 2020, sec. 4: 1e-4 to 0.02).
- ``scaled_linear``: sqrt(beta_t) linear from sqrt(beta_start) to sqrt(beta_end) (latent diffusion).
- ``squaredcos_cap_v2`` (alias ``cosine``): Nichol & Dhariwal 2021, "Improved DDPM", eq. 17,
      alpha_bar(t) = f(t) / f(0),  f(t) = cos(((t / T + s) / (1 + s)) * pi / 2)^2,  s = 0.008,
      beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), 0.999)   (clipped to avoid the singularity at t = T).

Everything is held in float64: alpha_bar_t near t = T is ~4e-5 for ``linear`` and its float32
cumulative product loses digits that the x0 prediction 1 / sqrt(alpha_bar_t) then amplifies.
"""

from __future__ import annotations

import math
import operator

import torch

from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.core.tensor import append_dims


def linear(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """beta_t linear in t (Ho et al. 2020, sec. 4)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64, device="cpu")


def scaled_linear(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """sqrt(beta_t) linear in t, then squared (the latent / Stable Diffusion schedule)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64, device="cpu") ** 2


def squaredcos_cap_v2(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule, Nichol & Dhariwal 2021 eq. 17, betas clipped at ``max_beta``."""
    steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64, device="cpu") / num_train_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


cosine = squaredcos_cap_v2

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")


def check_timesteps(t: int | torch.Tensor, num_train_timesteps: int, low: int | None = 0, name: str = "t") -> None:
    """Raise unless every timestep in ``t`` is an integer in ``[low, T)`` (``low=None``: no lower bound).

    A tensor must hold integers (a float tensor would be truncated or fail to index): ShapeError;
    an int out of range: ConfigError. Reads a device tensor's min / max back to the host (one sync).
    """
    T = num_train_timesteps
    rng = f"in [{low}, {T})" if low is not None else f"below {T}"
    if isinstance(t, torch.Tensor):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ShapeError(f"{name}: expected an integer tensor of timesteps {rng}, got dtype {t.dtype}")
        if t.numel() == 0:
            return
        lo, hi = int(t.min()), int(t.max())
        if hi >= T or (low is not None and lo < low):
            raise ShapeError(f"{name}: expected timesteps {rng}, num_train_timesteps={T}, got {lo}..{hi}")
        return
    try:
        i = operator.index(t)
    except TypeError:
        raise ConfigError(f"{name}: expected an integer timestep {rng}, got {t!r}") from None
    if i >= T or (low is not None and i < low):
        raise ConfigError(f"{name}: expected an integer timestep {rng}, num_train_timesteps={T}, got {i}")


class NoiseSchedule:
    """A discrete beta schedule and the quantities derived from it (all float64, on CPU).

    Attributes: ``betas``, ``alphas``, ``alphas_cumprod`` (alpha_bar_t), ``alphas_cumprod_prev``
    (alpha_bar_{t-1}, 1 at t = 0), ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
    ``posterior_variance`` (beta_tilde_t, Ho et al. eq. 7), ``snr`` (alpha_bar / (1 - alpha_bar)),
    each a ``(T,)`` tensor, and ``num_train_timesteps`` = T.
    """

    def __init__(self, betas: torch.Tensor, name: str = "custom") -> None:
        # Explicitly on CPU: the schedule holds no learned state, so it stays real even when the
        # model around it is built under torch.device("meta") (size checks before allocation).
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu").detach()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ConfigError(f"betas: expected a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ConfigError(
                f"betas: expected every beta in (0, 1], got min {betas.min().item():.3g}, max {betas.max().item():.3g}"
            )
        self.name = name
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat(
            [torch.ones(1, dtype=torch.float64, device="cpu"), self.alphas_cumprod[:-1]]
        )
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        # Python floats for the samplers: indexing a list is free and a float scalar broadcasts
        # against a tensor on any device without a host-device copy per step.
        self._alpha_bar_list = self.alphas_cumprod.tolist()
        self._tables: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_name(
        cls, name: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> NoiseSchedule:
        """One of :data:`BETA_SCHEDULES` (diffusers' ``beta_schedule`` names) with T steps."""
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps: expected an int >= 1, got {num_train_timesteps!r}")
        if name == "linear":
            betas = linear(num_train_timesteps, beta_start, beta_end)
        elif name == "scaled_linear":
            betas = scaled_linear(num_train_timesteps, beta_start, beta_end)
        elif name in ("squaredcos_cap_v2", "cosine"):
            name, betas = "squaredcos_cap_v2", squaredcos_cap_v2(num_train_timesteps)
        else:
            raise unknown_name("beta schedule", name, BETA_SCHEDULES)
        return cls(betas, name=name)

    @classmethod
    def from_betas(cls, betas: torch.Tensor | list[float]) -> NoiseSchedule:
        """A schedule from user-given betas (diffusers' ``trained_betas``)."""
        return cls(betas, name="custom")

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    def alpha_bar(self, t: int | torch.Tensor, like: torch.Tensor | None = None) -> float | torch.Tensor:
        """alpha_bar_t, with alpha_bar = 1 for t < 0 (diffusers' ``set_alpha_to_one``: the step to x0).

        An int ``t`` gives a Python float. A ``(B,)`` tensor gives a float64 tensor on its device,
        shaped by ``append_dims`` to broadcast against ``like`` when given; float64 so that the
        coefficients derived from it are exact before they are cast to the data's dtype.
        ``t >= T`` or a non-integer ``t`` is a ShapeError (tensor) / ConfigError (int).
        """
        check_timesteps(t, self.num_train_timesteps, low=None)
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            return self.alpha_bar_unchecked(t, like)
        t = operator.index(t)
        return 1.0 if t < 0 else self._alpha_bar_list[t]

    def alpha_bar_unchecked(self, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """``alpha_bar`` of a ``(B,)`` integer tensor the caller drew in range itself (a training
        loss's ``randint(0, T)``): no range check, so no device-to-host sync per step."""
        table = self._table_on(t.device)
        one = torch.ones((), dtype=table.dtype, device=t.device)
        a = torch.where(t >= 0, table[t.clamp(min=0)], one)
        return a if like is None else append_dims(a, like.ndim)

    def _table_on(self, device: torch.device) -> torch.Tensor:
        # one copy per device, not one host-to-device transfer per training step
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self.alphas_cumprod.to(device)
        return table

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, num_train_timesteps={self.num_train_timesteps})"
