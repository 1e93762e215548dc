"""Diffusion head: DDPM with a cosine schedule and epsilon prediction (CALM.md section 3).

Our own schedule and sampler (no vendored diffusion code). Notation: z is the clean latent (the
target posterior sample), x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, t in {0, ..., T-1}.

* Schedule (Nichol & Dhariwal 2021): f(u) = cos^2((u + s)/(1 + s) * pi/2),
  beta_t = min(1 - f((t+1)/T) / f(t/T), max_beta), abar_t = prod_{i<=t} (1 - beta_i).
* Respacing: S timesteps tau_0 < ... < tau_{S-1} = T-1 evenly spread; the sub-chain keeps abar at
  those steps and recomputes its betas: beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}} (abar_{tau_{-1}} = 1).
* Posterior q(x_{t-1} | x_t, z) = N(c1_t z + c2_t x_t, beta~_t): c1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t),
  c2 = (1 - abar_{t-1}) sqrt(1 - beta_t) / (1 - abar_t), beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).
* Reverse step: z^ = (x_t - sqrt(1 - abar_t) eps^) / sqrt(abar_t), mean = c1 z^ + c2 x_t, variance
  beta~_t (fixed; log clipped at t=0 to beta~_1 as in IDDPM), or with learned sigma
  exp(f log beta_t + (1 - f) log beta~_t), f = (v + 1)/2 from the net's second output v. No noise on the
  last step. Deterministic (DDIM, eta = 0): x_{t-1} = sqrt(abar_{t-1}) z^ + sqrt(1 - abar_{t-1}) eps^.

Numerical caveat (as in the reference): with max_beta = 0.999 the last abar is tiny (2.4e-9 at T = 1000),
and the first reverse step multiplies eps^ errors by about sqrt(abar_prev / abar) (~350x with 100 of
1000 steps), so a denoiser must predict eps ~ x_t very precisely at large t. Small or briefly trained
heads diverge there; a lower max_beta (or fewer train_timesteps) tames it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from calm_lightning.models.heads import register_head
from calm_lightning.models.heads.adaln import AdaLNMLP, SharedTimestepSampling
from calm_lightning.models.heads.base import GenerativeHead, SweepSetting, resolve_num_blocks

if TYPE_CHECKING:
    from calm_lightning.models.config import HeadConfig


@dataclass
class DiffusionHeadConfig:
    """Diffusion head with a cosine schedule and epsilon prediction (CALM.md section 3): ``model.head.diffusion.*``."""

    num_blocks: int = 0  # adaLN residual blocks; 0 = max(1, backbone layers // 4)
    train_timesteps: int = 1000  # discrete timesteps of the cosine schedule
    num_steps: int = 100  # respaced sampling steps
    deterministic: bool = False  # DDIM-style sampling instead of ancestral
    learn_sigma: bool = False  # also predict the variance interpolation
    cosine_offset: float = 0.008  # s of the cosine schedule, abar(u) ~ cos^2((u + s)/(1 + s) * pi/2)
    max_beta: float = 0.999  # upper clip of each beta_t (the cosine schedule's last beta would be 1)


def cosine_betas(num_timesteps: int, offset: float, max_beta: float) -> torch.Tensor:
    """Betas of the cosine schedule (module docstring): [T] float64, from abar ~ 1 down to abar ~ 0."""
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # [T+1]
    f = torch.cos((u + offset) / (1 + offset) * math.pi / 2).square()
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def respaced_timesteps(num_timesteps: int, num_steps: int) -> torch.Tensor:
    """S = num_steps evenly spread timesteps of {0, ..., T-1}, increasing, always ending at T-1: [S] long."""
    return torch.linspace(num_timesteps - 1, 0, num_steps, dtype=torch.float64).round().long().flip(0)


@dataclass
class DiffusionSchedule:
    """A (possibly respaced) chain: per step i the original timestep and every coefficient, float64 [S]."""

    timesteps: torch.Tensor  # [S] long: original timestep tau_i fed to the network
    alpha_bar: torch.Tensor  # [S] abar_{tau_i}

    def __post_init__(self) -> None:
        ab = self.alpha_bar
        self.alpha_bar_prev = torch.cat([ab.new_ones(1), ab[:-1]])  # [S]
        self.betas = 1 - ab / self.alpha_bar_prev  # [S] (respaced betas)
        self.posterior_variance = self.betas * (1 - self.alpha_bar_prev) / (1 - ab)  # [S] beta~
        # beta~_0 = 0: clip its log to beta~_1 (only the learned-variance interpolation ever reads it)
        first = self.posterior_variance[1:2] if len(ab) > 1 else self.betas[:1]
        self.posterior_log_variance = torch.cat([first, self.posterior_variance[1:]]).log()  # [S]
        self.log_betas = self.betas.log()  # [S]
        self.coef_z = self.betas * self.alpha_bar_prev.sqrt() / (1 - ab)  # [S] c1
        self.coef_x = (1 - self.alpha_bar_prev) * (1 - self.betas).sqrt() / (1 - ab)  # [S] c2

    @classmethod
    def cosine(cls, num_timesteps: int, offset: float, max_beta: float) -> DiffusionSchedule:
        """The full T-step training chain."""
        alpha_bar = torch.cumprod(1 - cosine_betas(num_timesteps, offset, max_beta), dim=0)
        return cls(torch.arange(num_timesteps), alpha_bar)

    def respace(self, num_steps: int) -> DiffusionSchedule:
        """The sub-chain on ``respaced_timesteps`` (of a full chain), betas recomputed from abar."""
        idx = respaced_timesteps(len(self.timesteps), num_steps)
        return DiffusionSchedule(self.timesteps[idx], self.alpha_bar[idx])

    def __len__(self) -> int:
        return len(self.timesteps)

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """A coefficient as float32 on ``device`` (for indexing by device tensors of steps)."""
        return getattr(self, name).to(device=device, dtype=torch.float32)


# model_fn(x[B, l], t[B] float original timesteps) -> (eps^[B, l], v[B, l] or None)
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


def diffusion_sample_loop(
    model_fn: DenoiseFn,
    x: torch.Tensor,
    schedule: DiffusionSchedule,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the reverse chain from x = x_{T-1} ~ N(0, I) [B, l] down to the clean latent [B, l] (float32).

    Ancestral (DDPM) or deterministic (DDIM, eta = 0) steps as in the module docstring.
    """
    x = x.float()
    for i in reversed(range(len(schedule))):
        t = torch.full(x.shape[:1], float(schedule.timesteps[i]), device=x.device)  # [B]
        eps, v = model_fn(x, t)
        ab, ab_prev = float(schedule.alpha_bar[i]), float(schedule.alpha_bar_prev[i])
        z_hat = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        if deterministic:
            x = math.sqrt(ab_prev) * z_hat + math.sqrt(1 - ab_prev) * eps
            continue
        x = float(schedule.coef_z[i]) * z_hat + float(schedule.coef_x[i]) * x  # posterior mean
        if i > 0:
            min_log, max_log = float(schedule.posterior_log_variance[i]), float(schedule.log_betas[i])
            log_var = (
                torch.full_like(x, min_log) if v is None else _interpolate_log_variance(v, min_log, max_log)
            )
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = x + (0.5 * log_var).exp() * noise
    return x


def _interpolate_log_variance(v: torch.Tensor, min_log, max_log) -> torch.Tensor:
    """Learned variance (IDDPM): f log beta + (1 - f) log beta~, f = (v + 1)/2 (v nominally in [-1, 1])."""
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def _normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) elementwise."""
    return 0.5 * (
        -1 + log_var2 - log_var1 + (log_var1 - log_var2).exp() + (mean1 - mean2).square() * (-log_var2).exp()
    )


def _normal_nll(x, mean, log_var) -> torch.Tensor:
    """-log N(x; mean, e^log_var) elementwise (continuous latents: no discretisation)."""
    return 0.5 * (math.log(2 * math.pi) + log_var + (x - mean).square() * (-log_var).exp())


@register_head("diffusion")
class DiffusionHead(SharedTimestepSampling, GenerativeHead):
    """Cosine-schedule DDPM with epsilon prediction, denoiser = the shared ``AdaLNMLP`` (CALM.md section 3).

    Training, each hidden replicated N = cfg.num_samples times with its own posterior sample z, noise eps
    and t ~ U{0, ..., T-1}:  L = mean_l ||eps^(x_t, t, h) - eps||^2  (+ L_vb if learn_sigma), averaged over N.
    With learn_sigma the net also outputs v (variance interpolation) and L_vb is, per dimension and in
    nats, KL(q(x_{t-1} | x_t, z) || p(x_{t-1} | x_t)) for t > 0 and -log p(z | x_0) for t = 0, with the
    mean's eps^ detached so L_vb trains only the variance (IDDPM / DiT "learned range" with weight 1).
    Sampling: cfg.diffusion.num_steps respaced steps, ancestral or deterministic (DDIM); `calm compare`
    sweeps the number of steps with the trained sampler.
    """

    config_class = DiffusionHeadConfig
    sampling_keys = ("num_steps", "deterministic")
    default_sweep_steps = (10, 25, 50, 100)

    @classmethod
    def validate(cls, cfg: HeadConfig) -> list[str]:
        d = cfg.diffusion
        if 1 <= d.num_steps <= d.train_timesteps:
            return []
        return [f"{cls.key('num_steps')}: must be in [1, train_timesteps={d.train_timesteps}], got {d.num_steps}"]

    @classmethod
    def param_split(
        cls, cfg: HeadConfig, hidden_size: int, latent_size: int, num_backbone_layers: int, sampling: bool = False
    ) -> tuple[int, int]:
        d = cfg.diffusion
        out = 2 * latent_size if d.learn_sigma else latent_size
        num_blocks = resolve_num_blocks(d.num_blocks, num_backbone_layers)
        return AdaLNMLP.param_split(latent_size, hidden_size, cfg.width or hidden_size, num_blocks, out, sampling)

    @classmethod
    def sample_evals(cls, cfg: HeadConfig) -> int:
        return cfg.diffusion.num_steps

    @classmethod
    def sampling_sweep(cls, cfg: HeadConfig, steps: Sequence[int] | None = None) -> list[SweepSetting]:
        """The trained sampler (ancestral or DDIM) at every number of steps up to train_timesteps."""
        d = cfg.diffusion
        solver = "ddim" if d.deterministic else "ancestral"
        return [
            SweepSetting(solver, n, n, (f"{cls.key('num_steps')}={n}",))
            for n in (steps or cls.default_sweep_steps)
            if n <= d.train_timesteps
        ]

    def __init__(self, hidden_size: int, latent_size: int, cfg: HeadConfig, num_backbone_layers: int):
        super().__init__(hidden_size, latent_size, cfg, num_backbone_layers)
        d = cfg.diffusion
        num_blocks = resolve_num_blocks(d.num_blocks, num_backbone_layers)
        out_size = 2 * latent_size if d.learn_sigma else latent_size
        self.net = AdaLNMLP(
            latent_size, hidden_size, cfg.width or hidden_size, num_blocks, out_size, eps=cfg.norm_eps
        )
        # Plain attributes (not buffers): float64 on CPU, never cast by .to(dtype), not checkpointed.
        self.schedule = DiffusionSchedule.cosine(d.train_timesteps, d.cosine_offset, d.max_beta)
        self.sampling_schedule = self.schedule.respace(d.num_steps)

    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, l], t: [B] original timesteps (or [1]: one for all rows), cond_emb: [G, w]
        (``net.embed_condition``; G divides B, see ``AdaLNMLP.forward``) -> (eps^[B, l], v[B, l] or None), float32."""
        out = self.net(x, t, cond_emb).float()
        lat = self.latent_size
        return (out[:, :lat], out[:, lat:]) if self.cfg.diffusion.learn_sigma else (out, None)

    def loss(self, hidden: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """Epsilon-prediction MSE (+ variational term) per position. hidden: [P, D]; mu, log_sigma: [P, l] -> [P]."""
        P, N, lat = hidden.shape[0], self.cfg.num_samples, self.latent_size
        device, sched = hidden.device, self.schedule
        cond = self.net.embed_condition(hidden, N)  # [P*N, w]
        mu = mu.detach().float().repeat_interleave(N, dim=0)  # [P*N, l]
        sigma = log_sigma.detach().float().exp().repeat_interleave(N, dim=0)
        z = mu + sigma * torch.randn(
            P * N, lat, device=device
        )  # clean latent: a posterior sample per replica
        t = torch.randint(0, len(sched), (P * N,), device=device)  # [P*N]
        noise = torch.randn(P * N, lat, device=device)
        ab = sched.table("alpha_bar", device)[t][:, None]  # [P*N, 1]
        xt = ab.sqrt() * z + (1 - ab).sqrt() * noise
        eps, v = self.denoise(xt, t.float(), cond)
        loss = (eps - noise).square().mean(-1)  # [P*N]
        if v is not None:
            loss = loss + self._variational_term(eps.detach(), v, xt, z, t, ab)
        return loss.view(P, N).mean(-1)  # [P]

    def _variational_term(self, eps, v, xt, z, t, ab) -> torch.Tensor:
        """L_vb per replica [P*N] (class docstring); only the variance output v gets gradients."""
        sched, device = self.schedule, xt.device

        def coef(name: str) -> torch.Tensor:
            return sched.table(name, device)[t][:, None]  # [P*N, 1]

        true_mean = coef("coef_z") * z + coef("coef_x") * xt
        true_log_var = coef("posterior_log_variance")
        z_hat = (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
        model_mean = coef("coef_z") * z_hat + coef("coef_x") * xt
        model_log_var = _interpolate_log_variance(v, true_log_var, coef("log_betas"))
        kl = _normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(-1)  # [P*N]
        nll = _normal_nll(z, model_mean, model_log_var).mean(-1)  # [P*N]
        return torch.where(t == 0, nll, kl)

    def sample(
        self, hidden: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """hidden: [P, D] -> latents [P, S, l] (float32) by the respaced reverse chain; ``generator`` on hidden's device."""
        P, S = hidden.shape[0], num_samples
        cond = self.net.embed_condition(hidden)  # [P, w], once for all steps and samples
        x = torch.randn(P * S, self.latent_size, generator=generator, device=hidden.device)
        z = diffusion_sample_loop(  # one t per step: the condition path runs per position, not per sample
            lambda x, t: self.denoise(x, t[:1], cond),
            x,
            self.sampling_schedule,
            self.cfg.diffusion.deterministic,
            generator,
        )
        return z.view(P, S, self.latent_size)
