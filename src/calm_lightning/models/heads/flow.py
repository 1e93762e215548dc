"""Flow-matching head: rectified flow from N(0, I) to the latent distribution (CALM.md section 3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from calm_lightning.models.heads import register_head
from calm_lightning.models.heads.adaln import AdaLNMLP, SharedTimestepSampling
from calm_lightning.models.heads.base import GenerativeHead, SweepSetting, resolve_num_blocks

if TYPE_CHECKING:
    from calm_lightning.models.config import HeadConfig

# Network evaluations per solver step.
SOLVER_EVALS = {"euler": 1, "midpoint": 2}


@dataclass
class FlowHeadConfig:
    """Flow-matching head (CALM.md section 3): ``model.head.flow.*``."""

    num_blocks: int = 0  # adaLN residual blocks; 0 = max(1, backbone layers // 4)
    solver: str = "midpoint"  # euler | midpoint
    num_steps: int = 4  # solver steps from t=0 to t=1
    time_scale: float = 1000.0  # t in [0, 1] is multiplied by this before the sinusoidal timestep embedding
    discrete_time: bool = False  # the net sees floor(t * time_scale), as the reference code (training and sampling)

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def integrate_flow(velocity: Velocity, x0: torch.Tensor, num_steps: int, solver: str) -> torch.Tensor:
    """Solve dx/dt = v(x, t) from t = 0 to 1 with ``num_steps`` equal steps, dt = 1/num_steps.

    velocity(x[B, l], t[B]) -> [B, l]; x0: [B, l] -> x1: [B, l].
    euler:    x <- x + dt v(x, t)
    midpoint: x <- x + dt v(x + (dt/2) v(x, t), t + dt/2)
    """
    if solver not in SOLVER_EVALS:
        raise ValueError(f"unknown flow solver {solver!r}; expected one of {sorted(SOLVER_EVALS)}")
    dt = 1.0 / num_steps
    x = x0
    for i in range(num_steps):
        t = torch.full(x.shape[:1], i * dt, device=x.device, dtype=torch.float32)  # [B]
        v = velocity(x, t)
        if solver == "midpoint":
            v = velocity(x + (dt / 2) * v, t + dt / 2)
        x = x + dt * v
    return x


@register_head("flow")
class FlowHead(SharedTimestepSampling, GenerativeHead):
    """Rectified flow (CALM.md section 3), velocity net = the shared ``AdaLNMLP``.

    Training: x_t = (1 - t) x0 + t x1, x0 ~ N(0, I), x1 = mu + sigma * eps (a posterior sample),
    t ~ U(0, 1); loss = mean_l ||v(x_t, t, h) - (x1 - x0)||^2, each hidden replicated N = cfg.num_samples
    times with its own x1, x0 and t, averaged over the N. Sampling integrates v from t = 0 to 1 with
    cfg.flow.solver over cfg.flow.num_steps steps. The net sees t * cfg.flow.time_scale (floored with
    cfg.flow.discrete_time, as the reference code). `calm compare` sweeps both solvers over its steps.
    """

    config_class = FlowHeadConfig
    sampling_keys = ("num_steps", "solver")
    default_sweep_steps = (1, 2, 4, 8, 16)

    @classmethod
    def validate(cls, cfg: HeadConfig) -> list[str]:
        f, errs = cfg.flow, []
        if f.solver not in SOLVER_EVALS:
            errs.append(f"{cls.key('solver')}: must be euler or midpoint, got {f.solver!r}")
        if f.num_steps < 1:
            errs.append(f"{cls.key('num_steps')}: must be >= 1, got {f.num_steps}")
        return errs

    @classmethod
    def param_split(
        cls, cfg: HeadConfig, hidden_size: int, latent_size: int, num_backbone_layers: int, sampling: bool = False
    ) -> tuple[int, int]:
        num_blocks = resolve_num_blocks(cfg.flow.num_blocks, num_backbone_layers)
        width = cfg.width or hidden_size
        return AdaLNMLP.param_split(latent_size, hidden_size, width, num_blocks, latent_size, sampling)

    @classmethod
    def sample_evals(cls, cfg: HeadConfig) -> int:
        return cfg.flow.num_steps * SOLVER_EVALS[cfg.flow.solver]

    @classmethod
    def sampling_sweep(cls, cfg: HeadConfig, steps: Sequence[int] | None = None) -> list[SweepSetting]:
        """Euler and midpoint at every number of steps."""
        return [
            SweepSetting(solver, n, n * evals, (f"{cls.key('solver')}={solver}", f"{cls.key('num_steps')}={n}"))
            for solver, evals in SOLVER_EVALS.items()
            for n in (steps or cls.default_sweep_steps)
        ]

    def __init__(self, hidden_size: int, latent_size: int, cfg: HeadConfig, num_backbone_layers: int):
        super().__init__(hidden_size, latent_size, cfg, num_backbone_layers)
        if cfg.flow.solver not in SOLVER_EVALS:
            raise ValueError(
                f"unknown flow solver {cfg.flow.solver!r}; expected one of {sorted(SOLVER_EVALS)}"
            )
        num_blocks = resolve_num_blocks(cfg.flow.num_blocks, num_backbone_layers)
        self.net = AdaLNMLP(latent_size, hidden_size, cfg.width or hidden_size, num_blocks, eps=cfg.norm_eps)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        """v(x_t, t | h). x: [B, l], t: [B] in [0, 1] (or [1]: one t for all rows), cond_emb: [G, w]
        (``net.embed_condition``; G divides B, see ``AdaLNMLP.forward``) -> [B, l] float32."""
        time = t * self.cfg.flow.time_scale
        if self.cfg.flow.discrete_time:  # the reference's net sees the integer part of 1000 t
            time = time.floor()
        return self.net(x, time, cond_emb).float()

    def loss(self, hidden: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """Flow-matching MSE per position. hidden: [P, D]; mu, log_sigma: [P, l] (constants) -> [P] float32."""
        P, N, lat = hidden.shape[0], self.cfg.num_samples, self.latent_size
        device = hidden.device
        cond = self.net.embed_condition(hidden, N)  # [P*N, w]
        mu = mu.detach().float().repeat_interleave(N, dim=0)  # [P*N, l]
        sigma = log_sigma.detach().float().exp().repeat_interleave(N, dim=0)  # [P*N, l]
        x1 = mu + sigma * torch.randn(P * N, lat, device=device)  # posterior sample per replica
        x0 = torch.randn(P * N, lat, device=device)
        t = torch.rand(P * N, device=device)  # [P*N]
        xt = (1 - t)[:, None] * x0 + t[:, None] * x1
        v = self.velocity(xt, t, cond)  # [P*N, l]
        return (v - (x1 - x0)).square().mean(-1).view(P, N).mean(-1)  # [P]

    def sample(
        self, hidden: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """hidden: [P, D] -> latents [P, S, l] (float32); ``generator`` (on hidden's device) seeds x0."""
        P, S = hidden.shape[0], num_samples
        cond = self.net.embed_condition(hidden)  # [P, w], once for all steps and samples
        x0 = torch.randn(P * S, self.latent_size, generator=generator, device=hidden.device)
        x1 = integrate_flow(  # one t per step: the condition path runs per position, not per sample
            lambda x, t: self.velocity(x, t[:1], cond), x0, self.cfg.flow.num_steps, self.cfg.flow.solver
        )
        return x1.view(P, S, self.latent_size)
