"""Generative heads: the interface contract over the registry, the energy score against closed forms,
solvers and schedules against exact answers, and tiny toy fits of each head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from calm_lightning.models.config import HeadConfig
from calm_lightning.models.heads import HEADS, build_head
from calm_lightning.models.heads.adaln import AdaLNMLP
from calm_lightning.models.heads.diffusion import (
    DiffusionSchedule,
    _interpolate_log_variance,
    cosine_betas,
    diffusion_sample_loop,
    respaced_timesteps,
)
from calm_lightning.models.heads.energy_loss import (
    draw_target_noise,
    energy_score_from_noise,
    energy_score_loss,
)
from calm_lightning.models.heads.flow import integrate_flow

D, LATENT, P = 12, 6, 5  # conditioning width, latent size, positions


# Small sizes for the heads that have them (any other registered head runs with its defaults).
SMALL = {
    "energy": {"noise_size": 8, "num_target_samples": 10},
    "flow": {"num_steps": 3},
    "diffusion": {"train_timesteps": 50, "num_steps": 5},
}


def tiny_cfg(name: str, **section) -> HeadConfig:
    """A small head config; ``section`` overrides fields of the head's own section."""
    cfg = HeadConfig(name=name, num_samples=4, width=16)
    for head, small in SMALL.items():
        if hasattr(cfg, head):
            for key, value in small.items():
                setattr(getattr(cfg, head), key, value)
    for key, value in section.items():
        setattr(getattr(cfg, name), key, value)
    return cfg


def make_head(name: str, **section):
    torch.manual_seed(0)
    return build_head(D, LATENT, tiny_cfg(name, **section), num_backbone_layers=4)


def perturb_zero_init(head: torch.nn.Module, std: float = 0.1) -> None:
    """Give the zero-initialised layers random values: at init every head's output ignores its inputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            if not p.any():
                p.add_(torch.randn(p.shape, generator=g) * std)


def targets(num_positions: int = P, latent: int = LATENT):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(num_positions, D, generator=g)
    mu = torch.randn(num_positions, latent, generator=g)
    log_sigma = torch.randn(num_positions, latent, generator=g) * 0.2 - 1.0
    return hidden, mu, log_sigma


HEAD_NAMES = sorted(HEADS)
# Every registered head with its defaults, plus the options that change the computation of the ones
# we know (a head added later is covered by its defaults without an edit here).
MORE_VARIANTS = {
    "energy": [{"shared_target_noise": False, "alpha": 1.5}, {"ffn_bias": True, "init": "normal"}],
    "flow": [{"solver": "euler"}],
    "diffusion": [{"learn_sigma": True}, {"deterministic": True}],
}
VARIANTS = [(name, opts) for name in HEAD_NAMES for opts in [{}, *MORE_VARIANTS.get(name, [])]]
VARIANT_IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in VARIANTS]


# ----------------------------------------------------------------------------- contract, over the registry


def test_registry_discovers_the_package_heads():
    import pkgutil

    from calm_lightning.models import heads

    assert {"energy", "flow", "diffusion"} <= set(HEADS)  # found without an import list
    modules = {f"{heads.__name__}.{m.name}" for m in pkgutil.iter_modules(heads.__path__)}
    for name in HEADS:
        assert HEADS[name].name == name and HEADS[name].__module__ in modules
        assert isinstance(make_head(name), HEADS[name])
    with pytest.raises(KeyError):
        build_head(D, LATENT, HeadConfig(name="nope"), 4)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_config_has_a_section_per_head(name):
    import dataclasses

    cls = HEADS[name]
    if cls.config_class is None:
        assert not hasattr(HeadConfig(), name)
        return
    assert dataclasses.is_dataclass(cls.config_class)
    assert isinstance(getattr(HeadConfig(), name), cls.config_class)  # with the dataclass's defaults
    assert cls.validate(HeadConfig()) == []  # the defaults are valid
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    assert set(cls.sampling_keys) <= fields


@pytest.mark.parametrize("name,opts", VARIANTS, ids=VARIANT_IDS)
def test_declared_param_split_and_evals_match_the_module(name, opts):
    cfg = tiny_cfg(name, **opts)
    head = build_head(D, LATENT, cfg, num_backbone_layers=4)
    once, per_eval = HEADS[name].param_split(cfg, D, LATENT, 4)
    assert once >= 0 and per_eval > 0
    assert once + per_eval == sum(p.numel() for p in head.parameters())
    assert head.evals_per_sample == HEADS[name].sample_evals(cfg) >= 1
    assert HEADS[name].train_evals(cfg) >= 1


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_sampling_sweep_overrides_only_sampling_keys(name):
    from calm_lightning.config.loader import load_config, to_object

    cls = HEADS[name]
    settings = cls.sampling_sweep(HeadConfig(name=name))
    assert settings and len({(s.solver, s.steps) for s in settings}) == len(settings)
    allowed = {cls.key(k) for k in cls.sampling_keys}
    for s in settings:
        assert {o.split("=")[0] for o in s.overrides} <= allowed
        cfg = to_object(load_config(None, [f"model.head.name={name}", *s.overrides])).model.head
        assert cls.sample_evals(cfg) == s.evals_per_sample


def test_default_declarations_of_an_undeclared_head():
    """A head that declares nothing still gets FLOPs (every parameter per evaluation), no section,
    no sampling keys and a one-step, one-setting sweep."""
    from calm_lightning.models.heads.base import GenerativeHead

    class Bare(GenerativeHead):
        def __init__(self, hidden_size, latent_size, cfg, num_backbone_layers):
            super().__init__(hidden_size, latent_size, cfg, num_backbone_layers)
            self.net = torch.nn.Linear(hidden_size, latent_size)

        def loss(self, hidden, mu, log_sigma):
            return (self.net(hidden) - mu).square().sum(-1)

        def sample(self, hidden, num_samples=1, generator=None):
            return self.net(hidden)[:, None].expand(-1, num_samples, -1)

    cfg = HeadConfig(name="bare", num_samples=3)
    assert Bare.param_split(cfg, D, LATENT, 4) == (0, D * LATENT + LATENT)
    assert (Bare.sample_evals(cfg), Bare.train_evals(cfg), Bare.validate(cfg)) == (1, 3, [])
    assert [(s.solver, s.steps, s.overrides) for s in Bare.sampling_sweep(cfg)] == [("one-step", 1, ())]


def test_eval_accepts_exactly_the_heads_sampling_keys():
    from calm_lightning.evaluation import EVAL_OVERRIDE_PREFIXES, HEAD_SAMPLING_KEYS

    want = {f"model.head.{name}.{k}" for name in HEADS for k in HEADS[name].sampling_keys}
    assert set(HEAD_SAMPLING_KEYS) == want
    assert {"model.head.flow.num_steps", "model.head.diffusion.deterministic"} <= want
    assert all(f"{k}=" in EVAL_OVERRIDE_PREFIXES for k in want)


@pytest.mark.parametrize("name,opts", VARIANTS, ids=VARIANT_IDS)
def test_loss_and_sample_shapes(name, opts):
    head = make_head(name, **opts)
    hidden, mu, log_sigma = targets()
    loss = head.loss(hidden, mu, log_sigma)
    assert loss.shape == (P,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    x = head.sample(hidden, num_samples=3)
    assert x.shape == (P, 3, LATENT) and x.dtype == torch.float32 and torch.isfinite(x).all()


@pytest.mark.parametrize("name,opts", VARIANTS, ids=VARIANT_IDS)
def test_gradients_reach_the_condition_not_the_targets(name, opts):
    head = make_head(name, **opts)
    perturb_zero_init(head)
    hidden, mu, log_sigma = targets()
    hidden.requires_grad_(True)
    mu.requires_grad_(True)
    log_sigma.requires_grad_(True)
    head.loss(hidden, mu, log_sigma).mean().backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0
    assert mu.grad is None and log_sigma.grad is None  # the AE posterior is a constant target
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_gradients_at_initialisation_are_finite(name):
    # zero-initialised outputs: every energy sample coincides, flow/diffusion outputs are 0
    head = make_head(name)
    hidden, mu, log_sigma = targets()
    head.loss(hidden, mu, log_sigma).mean().backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name,opts", VARIANTS, ids=VARIANT_IDS)
def test_sample_is_reproducible_under_a_seeded_generator(name, opts):
    head = make_head(name, **opts)
    perturb_zero_init(head)
    hidden, _, _ = targets()
    with torch.no_grad():
        a = head.sample(hidden, 4, generator=torch.Generator().manual_seed(7))
        b = head.sample(hidden, 4, generator=torch.Generator().manual_seed(7))
        c = head.sample(hidden, 4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[:, 0], a[:, 1])  # the S samples of one position are distinct


@pytest.mark.parametrize("name,opts", VARIANTS, ids=VARIANT_IDS)
def test_bf16_autocast_on_cpu(name, opts):
    head = make_head(name, **opts)
    perturb_zero_init(head)
    hidden, mu, log_sigma = targets()
    hidden.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head.loss(hidden, mu, log_sigma)
        x = head.sample(hidden, 2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    loss.mean().backward()
    assert torch.isfinite(hidden.grad).all()


def test_evals_per_sample():
    assert make_head("energy").evals_per_sample == 1
    assert make_head("flow", solver="euler", num_steps=7).evals_per_sample == 7
    assert make_head("flow", solver="midpoint", num_steps=4).evals_per_sample == 8
    assert make_head("diffusion", num_steps=9).evals_per_sample == 9


def test_zero_initialised_outputs():
    hidden, _, _ = targets()
    assert torch.equal(make_head("energy").sample(hidden, 3), torch.zeros(P, 3, LATENT))
    net = AdaLNMLP(LATENT, D, width=16, num_blocks=2)
    out = net(torch.randn(P, LATENT), torch.rand(P) * 100, net.embed_condition(hidden))
    assert torch.equal(out, torch.zeros(P, LATENT))


def test_energy_head_width_and_blocks_from_config():
    cfg = tiny_cfg("energy", num_blocks=0)
    cfg.width = 0
    head = build_head(D, LATENT, cfg, num_backbone_layers=8)
    assert head.width == D and len(head.blocks) == 2  # width 0 = hidden size; blocks = layers // 4
    blk = head.blocks[0]
    assert sum(p.numel() for p in blk.parameters() if p.dim() == 2) == 6 * D * D  # ~6 w^2 per block


def test_energy_block_matches_the_reference_formula():
    # e + W2(SiLU(W1 x) * W3 x), x = SiLU(L2(SiLU(L1([LN(e), c])))): the SiLU after L2 keeps L2 and
    # the gated FFN's input projections from collapsing into one linear map (reference block).
    from calm_lightning.models.heads.energy import EnergyBlock

    torch.manual_seed(0)
    block = EnergyBlock(8)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    e, c = torch.randn(5, 8), torch.randn(5, 8)
    first, second = block.fuse[0], block.fuse[2]
    x = F.silu(second(F.silu(first(torch.cat([block.norm(e), c], -1)))))
    ffn = block.ffn
    expected = e + ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x))
    torch.testing.assert_close(block(e, block.condition(c)), expected)


def test_unknown_flow_solver_is_rejected():
    with pytest.raises(ValueError):
        make_head("flow", solver="rk4")
    with pytest.raises(ValueError):
        integrate_flow(lambda x, t: x, torch.zeros(2, 2), 2, "rk4")


# ----------------------------------------------------------------------------- energy score


def naive_energy_score(x, mu, sigma, eps, signs, alpha):
    """The textbook estimator with explicit target samples, in float64."""
    x, mu, sigma, eps = x.double(), mu.double(), sigma.double(), eps.double()
    noise = eps[None] * signs.double()[:, None] if signs is not None else eps  # [P, M, l]
    z = mu[:, None] + sigma[:, None] * noise  # [P, M, l]
    attraction = 2 * ((x[:, :, None] - z[:, None]).norm(dim=-1) ** alpha).mean(dim=(1, 2))
    i, k = torch.triu_indices(x.shape[1], x.shape[1], offset=1)  # the N(N-1)/2 unordered pairs
    return attraction - ((x[:, i] - x[:, k]).norm(dim=-1) ** alpha).mean(-1)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 1.5])
def test_energy_score_equals_the_textbook_estimator(shared, alpha):
    g = torch.Generator().manual_seed(3)
    p, n, m, lat = 7, 5, 11, 4
    x = torch.randn(p, n, lat, generator=g)
    mu, sigma = torch.randn(p, lat, generator=g), torch.rand(p, lat, generator=g) + 0.1
    eps, signs = draw_target_noise(p, lat, m, shared, generator=g)
    x_fast, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    weights = torch.randn(p, generator=g)
    fast = energy_score_from_noise(x_fast, mu, sigma, eps, signs, alpha)
    ref = naive_energy_score(x_ref, mu, sigma, eps, signs, alpha)
    (fast * weights).sum().backward()
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_fast.grad.double(), x_ref.grad, atol=1e-5, rtol=1e-4)


def expected_abs_normal(m: float, s: float) -> float:
    """E|D| for D ~ N(m, s^2)."""
    phi = 0.5 * (1 + math.erf((-m / s) / math.sqrt(2)))  # Phi(-m/s)
    return s * math.sqrt(2 / math.pi) * math.exp(-(m**2) / (2 * s**2)) + m * (1 - 2 * phi)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_energy_score_expectation_matches_the_gaussian_closed_form(shared, alpha):
    # model X ~ N(m1, s1^2 I), target Y ~ N(m2, s2^2 I), E[L] = 2 E||X - Y||^a - E||X - X'||^a:
    # a = 1, 1-D: E|D| of the normal differences; a = 2, lat-D: E||X - Y||^2 = lat ((m1 - m2)^2 + s1^2 + s2^2),
    # E||X - X'||^2 = 2 lat s1^2 (a = 2 is not strictly proper, but the estimator is still unbiased)
    m1, s1, m2, s2 = 0.3, 0.8, -0.4, 0.5
    lat = 1 if alpha == 1.0 else 8
    if alpha == 1.0:
        want = 2 * expected_abs_normal(m1 - m2, math.hypot(s1, s2)) - expected_abs_normal(
            0.0, math.sqrt(2) * s1
        )
    else:
        want = 2 * lat * ((m1 - m2) ** 2 + s1**2 + s2**2) - 2 * lat * s1**2
    # seeds: with the shared bank the positions of one call are dependent, so average over calls
    p, n, m, seeds = 1000, 4, 32, 48
    mu, sigma = torch.full((p, lat), m2), torch.full((p, lat), s2)
    means = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        x = m1 + s1 * torch.randn(p, n, lat, generator=g)
        means.append(energy_score_loss(x, mu, sigma, m, alpha, generator=g, shared_noise=shared).mean())
    means = torch.stack(means).double()
    stderr = (means.std() / math.sqrt(seeds)).item()
    assert stderr < 0.01 * abs(want)  # the check below has teeth
    assert abs(means.mean().item() - want) < 4 * stderr, (means.mean().item(), want, stderr)


def test_energy_score_gradient_is_finite_for_coincident_samples():
    x = torch.zeros(3, 4, 2, requires_grad=True)  # every sample identical (the head at initialisation)
    loss = energy_score_loss(
        x, torch.ones(3, 2), torch.ones(3, 2), 5, 1.0, generator=torch.Generator().manual_seed(0)
    )
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    # only the attraction pulls (identically for every sample); the repulsion has no direction at 0
    torch.testing.assert_close(x.grad, x.grad[:, :1].expand_as(x.grad))


def test_energy_score_rejects_a_single_sample():
    with pytest.raises(ValueError):
        energy_score_loss(torch.zeros(2, 1, 3), torch.zeros(2, 3), torch.ones(2, 3), 4, 1.0)


def fit(head, mus, sigmas, steps, lr, batch=64):
    """Train on condition c = position % C (one-hot hidden) against N(mus[c], sigmas[c]^2); sample [C, S, l]."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)  # a quiet final iterate
    num_cond = mus.shape[0]
    c = torch.arange(batch) % num_cond
    hidden = F.one_hot(c, num_cond).float()
    for _ in range(steps):
        loss = head.loss(hidden, mus[c], sigmas[c].log()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    with torch.no_grad():
        return head.sample(torch.eye(num_cond), 2000, generator=torch.Generator().manual_seed(1))  # [C, S, l]


def test_energy_head_fits_a_gaussian_from_a_constant_condition():
    torch.manual_seed(0)
    cfg = HeadConfig(name="energy", num_samples=8, width=16)
    cfg.energy.noise_size, cfg.energy.num_blocks, cfg.energy.num_target_samples = 4, 1, 32
    head = build_head(1, 1, cfg, num_backbone_layers=4)
    mean, std = torch.tensor([[0.7]]), torch.tensor([[0.4]])
    x = fit(head, mean, std, steps=300, lr=3e-3)
    assert abs(x.mean().item() - 0.7) < 0.05
    assert abs(x.std().item() - 0.4) < 0.05


# ----------------------------------------------------------------------------- toy fits, every head

# per head: config overrides, optimiser steps, learning rate. Diffusion uses max_beta = 0.9 and T = 100:
# with the default 0.999 the last abar is tiny (2.4e-9 at T = 1000) and the first reverse step multiplies
# eps errors by ~sqrt(abar_prev / abar) (~350x at 100 of 1000 steps), which a tiny briefly trained net
# cannot survive. Its 50 sampling steps still exercise the respacing.
TOY_SETTINGS = {
    "energy": dict(
        width=32, energy=dict(num_blocks=1, noise_size=8, num_target_samples=32), steps=400, lr=3e-3
    ),
    "flow": dict(width=32, flow=dict(num_blocks=2, solver="midpoint", num_steps=8), steps=400, lr=3e-3),
    "diffusion": dict(
        width=64,
        diffusion=dict(num_blocks=2, max_beta=0.9, train_timesteps=100, num_steps=50),
        steps=800,
        lr=2e-3,
    ),
}


@pytest.mark.parametrize("name", [n for n in HEAD_NAMES if n in TOY_SETTINGS])
def test_tiny_head_fits_a_conditional_2d_gaussian(name):
    settings = dict(TOY_SETTINGS[name])
    torch.manual_seed(0)
    cfg = HeadConfig(name=name, num_samples=8, width=settings.pop("width"))
    for key, value in settings.pop(name).items():
        setattr(getattr(cfg, name), key, value)
    head = build_head(2, 2, cfg, num_backbone_layers=4)
    mus = torch.tensor([[1.0, -0.5], [-1.0, 1.0]])  # condition 0 / 1
    sigmas = torch.tensor([[0.3, 0.6], [0.6, 0.2]])
    x = fit(head, mus, sigmas, **settings)
    mean_err = (x.mean(1) - mus).abs().max().item()
    std_rel_err = ((x.std(1) - sigmas).abs() / sigmas).max().item()
    assert mean_err < 0.08, mean_err
    assert std_rel_err < 0.15, std_rel_err


# ----------------------------------------------------------------------------- flow solvers


@pytest.mark.parametrize("solver,steps", [("euler", 200), ("midpoint", 20)])
def test_flow_solver_reproduces_a_gaussian_with_the_exact_velocity(solver, steps):
    # x0 ~ N(0, 1), x1 ~ N(m, s^2) independent: x_t ~ N(t m, v_t), v_t = (1-t)^2 + t^2 s^2, and the
    # marginal velocity E[x1 - x0 | x_t = x] = m + (t s^2 - (1 - t)) / v_t * (x - t m).
    m, s = torch.tensor([1.5, -0.5]), torch.tensor([0.3, 2.0])

    def velocity(x, t):
        t = t[:, None]
        var = (1 - t) ** 2 + t**2 * s**2
        return m + (t * s**2 - (1 - t)) / var * (x - t * m)

    x0 = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    x1 = integrate_flow(velocity, x0, steps, solver)
    torch.testing.assert_close(x1.mean(0), m, atol=0.03, rtol=0)
    torch.testing.assert_close(x1.std(0), s, atol=0, rtol=0.03)
    # the same map with too few Euler steps is measurably wrong (the check has teeth)
    coarse = integrate_flow(velocity, x0, 2, "euler")
    assert ((coarse.std(0) - s).abs() / s).max() > 0.1


# ----------------------------------------------------------------------------- diffusion schedule and sampler


def test_cosine_schedule_is_monotone_from_one_to_zero():
    betas = cosine_betas(1000, offset=0.008, max_beta=0.999)
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert (betas > 0).all() and (betas <= 0.999).all()
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    assert alpha_bar[0] > 0.9999 and alpha_bar[-1] < 1e-6
    # abar_t = f(t+1)/f(0), f(u) = cos^2((u/T + s)/(1 + s) pi/2), wherever beta is not clipped
    f = torch.cos((torch.arange(1001, dtype=torch.float64) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(alpha_bar[:-1], f[1:-1] / f[0])


@pytest.mark.parametrize("num_steps", [1, 7, 100, 1000])
def test_respaced_chain_is_consistent_with_alpha_bar(num_steps):
    full = DiffusionSchedule.cosine(1000, 0.008, 0.999)
    sub = full.respace(num_steps)
    ts = sub.timesteps
    assert len(sub) == num_steps and ts[-1] == 999 and (ts[1:] > ts[:-1]).all()
    torch.testing.assert_close(ts, respaced_timesteps(1000, num_steps))
    torch.testing.assert_close(torch.cumprod(1 - sub.betas, 0), full.alpha_bar[ts])  # recomputed betas
    torch.testing.assert_close(
        sub.posterior_variance, sub.betas * (1 - sub.alpha_bar_prev) / (1 - sub.alpha_bar)
    )
    if num_steps == 1000:
        torch.testing.assert_close(sub.betas, cosine_betas(1000, 0.008, 0.999))
    if num_steps > 1:
        assert ts[0] == 0


def test_learned_variance_interpolates_between_the_two_bounds():
    v = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(_interpolate_log_variance(v, -4.0, -2.0), torch.tensor([-4.0, -3.0, -2.0]))


@pytest.mark.parametrize("deterministic", [False, True])
def test_diffusion_sampler_reproduces_a_gaussian_with_the_exact_epsilon(deterministic):
    # z ~ N(m, s^2): E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar)
    m, s = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.8])
    full = DiffusionSchedule.cosine(1000, 0.008, 0.999)

    def exact_eps(x, t):
        ab = full.alpha_bar[t.long()].float()[:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * s**2 + 1 - ab), None

    g = torch.Generator().manual_seed(0)
    x = diffusion_sample_loop(
        exact_eps, torch.randn(20000, 2, generator=g), full.respace(200), deterministic, g
    )
    torch.testing.assert_close(x.mean(0), m, atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), s, atol=0, rtol=0.04)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_adaln_with_one_timestep_equals_the_per_row_net(learn_sigma):
    """Sampling passes one t per step and one condition per position (the condition path runs on the G
    positions, broadcast over their S samples): the same outputs as every row with its own t and
    repeated condition. Random weights (the zero-initialised modulations would hide a wrong broadcast)."""
    torch.manual_seed(0)
    lat, D, P, S = 6, 10, 5, 7
    net = AdaLNMLP(lat, D, 16, 2, out_size=2 * lat if learn_sigma else lat)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    hidden, x = torch.randn(P, D), torch.randn(P * S, lat)
    t = torch.full((P * S,), 37.0)
    per_row = net(x, t, net.embed_condition(hidden, S))
    grouped = net(x, t[:1], net.embed_condition(hidden))
    assert torch.allclose(grouped, per_row, atol=1e-5, rtol=1e-5)
    # rows of one position really differ only through x (not a degenerate broadcast)
    assert not torch.allclose(grouped[0], grouped[1])
    with pytest.raises(ValueError):
        net(x[:-1], t[:1], net.embed_condition(hidden))
