"""The exact temperature sampler: rejection + Bernoulli factory (CALM paper, section 5 / CALM.md 5).

Target P_T(x) proportional to P(x)^(1/T) from a sampler of P only, vectorised over C contexts; the
shared definitions (draw functions, s = 1/T = n + a, grouping identical chunks) are in
`sampling/temperature.py`, whose ``temperature_sample`` is the entry point generation uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calm_lightning.errors import CalmError
from calm_lightning.sampling.temperature import DrawFn, inverse_temperature


@dataclass
class ExactSampleStats:
    """Cost and fallbacks of the exact sampler.

    draws: [C] draws consumed per context by the sequential algorithm (what the expected-cost
        formula counts); never more than ``max_draws``.
    fallback: [C] bool, the context hit ``max_draws`` and returned a fallback chunk.
    draws_made: total samples requested from ``draw_fn`` (block draws past an event are discarded).
    rounds: number of vectorised rounds.
    """

    draws: torch.Tensor
    fallback: torch.Tensor
    draws_made: int
    rounds: int

    @property
    def num_fallbacks(self) -> int:
        return int(self.fallback.sum())


def expected_exact_draws(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Expected draws of the exact sampler, (n + 1{a>0} sum_x P(x)^(s-1)) / Z_T, Z_T = sum_x P(x)^s.

    probs: [..., X] a categorical P per row (zeros allowed). Returns [...].
    """
    s, n, a = inverse_temperature(temperature)
    z = probs.pow(s).sum(-1)
    extra = probs.pow(s - 1).sum(-1) if a > 0 else torch.zeros_like(z)  # s - 1 > 0 here, so 0^(s-1) = 0
    return (n + extra) / z


def exact_temperature_sample(
    draw_fn: DrawFn,
    num_contexts: int,
    temperature: float,
    *,
    block_size: int = 8,
    max_block_size: int = 1024,
    max_draws: int = 100_000,
    generator: torch.Generator | None = None,
    index_device: torch.device | str | None = None,
) -> tuple[torch.Tensor, ExactSampleStats]:
    """Exact sample of P^(1/T) / Z_T per context with only a sampler of P (CALM.md 5).

    Sequential algorithm per context, s = 1/T = n + a:
      1. Draw n samples; if not all equal, restart; else candidate x*.
      2. If a == 0, return x*. Else for i = 1, 2, ...: draw x; if x == x* return x*; with
         probability a/i restart from step 1.
    Step 1 accepts x with probability P(x)^n; the loop of step 2 is a Bernoulli factory that
    accepts with probability P(x)^a (it stops at step i with probability P(x) (1 - P(x))^(i-1)
    prod_{j<i} (1 - a/j) and sums to P(x)^a), so the output is P^s / Z_T exactly.

    Vectorised emulation: all pending contexts advance together in rounds. Each step draws a block
    of B draws per context, B = the mean number of draws its contexts have already spent in that
    step (since entering it), rounded up to a power of two and clamped to [``block_size``,
    ``max_block_size``] and to the draws left before the cap: fresh contexts get small blocks (the factory often stops at i = 1 with
    probability P(x) + (1 - P(x)) a), long-running ones doubling blocks (few rounds). A context in step 1
    gets R = max(1, B // n) attempts (R n draws) and takes the first attempt whose n draws are all
    equal; a context in step 2 gets B draws and coins u_i and stops at the first i with x_i == x*
    (accept) or u_i < a/i (restart), i counting on across rounds. Draws after that event are
    discarded: they are independent of everything before, so consuming draws in order up to the
    event is the sequential algorithm and the distribution stays exact (for any block sizes).
    ``draw_fn`` is called at most twice per round, on the contexts in each step.

    Cap: a context never consumes more than ``max_draws`` draws (events past the cap are masked).
    A context that reaches it returns a fallback chunk and is flagged in ``stats.fallback``: its
    current candidate x* if it holds one (a sample at temperature 1/n, up to the cap's selection),
    else a plain draw of P. Exactness therefore holds conditionally on no fallback; the expected
    cost is ``expected_exact_draws``, which explodes on large supports as T -> 0 or T -> 1.
    T = 1 is plain sampling: one draw per context.

    draw_fn(context_index [C'], num) -> [C', num, K]; the indices live on ``index_device`` (default
    CPU), the sampler's state on the draws' device. ``generator`` (on the draws' device) drives the
    coins only. Returns chunks [C, K] and ``ExactSampleStats``.
    """
    s, n, a = inverse_temperature(temperature)
    if min(block_size, max_block_size, max_draws) < 1:
        raise CalmError(
            f"block_size, max_block_size and max_draws must be >= 1, got {block_size}, {max_block_size}, {max_draws}"
        )
    index_device = torch.device("cpu") if index_device is None else torch.device(index_device)
    width = min(block_size, max_block_size)
    attempts = 1 if n == 1 else max(1, width // n)  # step 1 always succeeds at once when n == 1
    block = draw_fn(torch.arange(num_contexts, device=index_device), attempts * n)  # [C, R n, K]
    device, k = block.device, block.shape[-1]
    draws = torch.zeros(num_contexts, dtype=torch.long, device=device)
    draws_made = block.shape[0] * block.shape[1]
    if n == 1 and a == 0:  # T = 1: the first draw is the sample
        return block[:, 0], ExactSampleStats(
            draws + 1, torch.zeros_like(draws, dtype=torch.bool), draws_made, 1
        )

    chunks = block.new_zeros(num_contexts, k)
    candidate = block.new_zeros(num_contexts, k)  # x* where has_candidate
    last_draw = block[:, 0].clone()  # a plain draw of P, the fallback without a candidate
    has_candidate = torch.zeros(num_contexts, dtype=torch.bool, device=device)
    done = torch.zeros_like(has_candidate)
    fallback = torch.zeros_like(has_candidate)
    step = torch.ones_like(draws)  # i of the Bernoulli factory
    spent = torch.zeros_like(draws)  # draws consumed since entering the current step

    def block_width(idx: torch.Tensor) -> int:
        mean_spent = int(spent[idx].double().mean().ceil().item())
        width = min(max(block_size, 1 << max(0, mean_spent - 1).bit_length()), max_block_size)
        return min(width, int((max_draws - draws[idx]).max().item()))  # nothing past the cap

    rounds = 0
    while True:
        rounds += 1
        # Step 1: contexts without a candidate look for n equal draws among R attempts.
        idx = (~done & ~has_candidate).nonzero().squeeze(-1)
        if idx.numel():
            if block is None:
                attempts = 1 if n == 1 else max(1, block_width(idx) // n)
                block = draw_fn(idx.to(index_device), attempts * n)
                draws_made += block.shape[0] * block.shape[1]
            x = block.view(idx.numel(), attempts, n, k)  # [C1, R, n, K]
            last_draw[idx] = x[:, 0, 0]
            equal = (x == x[:, :, :1]).all(-1).all(-1)  # [C1, R]
            used = torch.arange(1, attempts + 1, device=device) * n  # [R] draws consumed through attempt r
            within = draws[idx].unsqueeze(-1) + used <= max_draws  # [C1, R]
            equal &= within
            hit = equal.any(-1)
            at = equal.to(torch.uint8).argmax(-1)  # first successful attempt
            consumed = torch.where(hit, (at + 1) * n, within.sum(-1) * n)
            draws[idx] += consumed
            spent[idx] += consumed
            got = idx[hit]
            spent[got] = 0
            candidate[got] = x[hit, at[hit], 0]
            if a == 0:
                chunks[got] = candidate[got]
                done[got] = True
            else:
                has_candidate[got] = True
                step[got] = 1
        block = None

        # Step 2: contexts holding x* run the Bernoulli factory over B draws and coins. A context that
        # found x* with its last allowed draw has no draw left: the cap below flags it.
        idx = (~done & has_candidate & (draws < max_draws)).nonzero().squeeze(-1)
        if idx.numel():
            width = block_width(idx)
            y = draw_fn(idx.to(index_device), width)  # [C2, B, K]
            draws_made += y.shape[0] * y.shape[1]
            offset = torch.arange(width, device=device)
            i = (step[idx].unsqueeze(-1) + offset).to(torch.float64)  # [C2, B]
            coins = torch.rand(idx.numel(), width, generator=generator, device=device, dtype=torch.float64)
            match = (y == candidate[idx].unsqueeze(1)).all(-1)  # [C2, B]
            within = draws[idx].unsqueeze(-1) + offset + 1 <= max_draws
            event = (match | (coins * i < a)) & within  # u_i < a / i
            stop = event.any(-1)
            at = event.to(torch.uint8).argmax(-1, keepdim=True)  # first event
            accepted = stop & match.gather(-1, at).squeeze(-1)
            restarted = stop & ~accepted
            consumed = torch.where(stop, at.squeeze(-1) + 1, within.sum(-1))
            draws[idx] += consumed
            spent[idx] += consumed
            step[idx] += width
            chunks[idx[accepted]] = candidate[idx[accepted]]
            done[idx[accepted]] = True
            has_candidate[idx[restarted]] = False
            spent[idx[restarted]] = 0

        # Cap: the next action (n draws in step 1, one in step 2) no longer fits.
        need = torch.where(has_candidate, 1, n)
        capped = ~done & (draws + need > max_draws)
        if capped.any():
            chunks[capped] = torch.where(
                has_candidate[capped].unsqueeze(-1), candidate[capped], last_draw[capped]
            )
            fallback |= capped
            done |= capped
        if bool(done.all()):
            break
    return chunks, ExactSampleStats(draws, fallback, draws_made, rounds)
