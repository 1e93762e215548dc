"""Argmax of a vocabulary projection, argmax_v <h, w_v>, without the full fp32 logits where that is cheaper.

Every head sample CALM generates or scores is decoded greedily by the autoencoder: at T < 1 a
generation step decodes C x N candidates x K positions x V logits (16 x 200 x 4 x 8192 is ~27 G
multiply-adds), which dominates sampling. Only the argmax is needed, so:

``screen="bf16"``: project in bf16 (native bf16 matmul is ~4x the fp32 peak on AVX512_BF16/AMX CPUs)
in row tiles, and keep the bf16 top-1 wherever it provably is the fp32 argmax; recompute in fp32
only the rows where it might not be. The proof is a bound on the bf16 scores' error. With
u = 2^-8 (bf16's unit round-off) and g = d 2^-24 (fp32 accumulation over d terms), for every row h
and vocabulary vector w_v, both the bf16 score A_v and the fp32 score F_v are within
c * sum_i |h_i w_vi| <= c * ||h|| ||w_v|| of the exact dot product, c = 3u + 4u^2 + 3g (rounding of h
and w_v: 2u + u^2; fp32 accumulation in the bf16 GEMM and in the fp32 reference: 2g (1 + u)^2; the
bf16 output: u (1 + 2u + u^2)(1 + g)). So if the bf16 top-1 beats the bf16 runner-up by more than
2 c ||h|| max_v ||w_v|| (plus a tiny absolute slack for flushed denormals), every other fp32 score is
strictly below its fp32 score: the same token as the full fp32 argmax, and ties included (an exact
tie has margin 0 and is recomputed, where fp32 takes the first index). Rows are recomputed with the
same fp32 projection, so the result equals ``F.linear(h, w).argmax(-1)`` row by row.

The screen pays only where margins are wide (trained decoders); on near-flat logits (random weights)
most rows need the fp32 pass. So the first ``_PROBE_ROWS`` rows are screened as a probe, and if more
than ``_MAX_RECHECK`` of them needed fp32, the remaining rows skip the screen (same tokens either way).
A losing probe also backs off across calls on the same weight: after f losing probes in a row the next
min(2^f, ``_MAX_BACKOFF``) calls go straight to fp32, and one winning probe resets f. Decoding calls come
in long runs on one decoder (a generation step decodes a few hundred rows), so on a decoder whose
margins are narrow the probe's wasted bf16 pass stops costing ~1/3 of every call; on one whose margins
are wide nothing changes. The tokens never depend on this (both paths give the fp32 argmax).

``screen="fp32"``: the plain fp32 projection + argmax (the reference code's decoding).
``screen="auto"``: bf16 on CPUs with native bf16 (``cpu_has_fast_bf16``), fp32 elsewhere: emulated
bf16 is slower than fp32, and on CUDA cuBLAS may reduce bf16 products in reduced precision (its
default), which the bound does not cover. Under an active autocast the projection already runs in
low precision; then the plain path runs (autocast's choice, as before).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from calm_lightning.models.config import ARGMAX_SCREENS as SCREENS
from calm_lightning.utils.hardware import cpu_has_fast_bf16

_U = 2.0**-8
_ROW_TILE = 4096  # rows per bf16 tile: 4096 x V=8192 bf16 logits is 64 MiB
_PROBE_ROWS = 512  # the first tile: if more than _MAX_RECHECK of it needs fp32, the rest goes straight to fp32
_MAX_RECHECK = 0.25  # bf16 pass ~0.65x the fp32 one here, so past ~30% re-checked rows the screen loses
_ABS_SLACK = 1e-30  # products flushed to zero by FTZ/DAZ (each < 2^-126) summed over d <= 2^16
_MIN_ROWS = 64  # fewer rows (a generation step at T = 1): the fp32 projection is cheap, skip the screen
_MAX_BACKOFF = 64  # most calls in a row that skip the screen after losing probes
_BF16_WEIGHTS: dict = {}  # "entry" -> (weak ref to the weight, its version, bf16 copy, max row norm, backoff)


def error_coefficient(d: int) -> float:
    """c of the module docstring: |bf16 score - exact| and |fp32 score - exact| <= c ||h|| ||w_v||."""
    g = d * 2.0**-24
    return 3 * _U + 4 * _U**2 + 3 * g


def resolve_screen(screen: str, device: torch.device) -> str:
    if screen not in SCREENS:
        raise ValueError(f"argmax screen must be one of {', '.join(SCREENS)}, got {screen!r}")
    if screen != "auto":
        return screen
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def _bf16_weight(weight: torch.Tensor) -> tuple[torch.Tensor, float, dict]:
    """bf16 copy of ``weight``, its largest row norm and its probe backoff state (``losses``: losing
    probes in a row, ``skip``: calls left that skip the screen), cached while it is the same tensor object
    (held by a weak reference, so a new tensor at a recycled address never hits) at the same version
    (an in-place update, e.g. ``load_state_dict`` or an optimizer step, bumps it; the backoff restarts).
    One entry: decoding uses one matrix."""
    hit = _BF16_WEIGHTS.get("entry")
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2], hit[3], hit[4]
    with torch.no_grad():
        copy, norm = weight.detach().to(torch.bfloat16), float(weight.detach().norm(dim=-1).max())
    backoff = {"losses": 0, "skip": 0}
    _BF16_WEIGHTS["entry"] = (weakref.ref(weight), weight._version, copy, norm, backoff)
    return copy, norm, backoff


def projection_argmax(
    h: torch.Tensor, weight: torch.Tensor, screen: str = "auto", stats: dict | None = None
) -> torch.Tensor:
    """argmax_v <h, weight_v> per row, equal to ``F.linear(h, weight).argmax(-1)`` (module docstring).

    h: [..., d]; weight: [V, d]. Returns LongTensor [...]. ``stats`` (optional) receives ``rows`` and
    ``rechecked`` (rows recomputed in fp32) when the bf16 screen ran.
    """
    mode = resolve_screen(screen, h.device)
    if (mode == "fp32" or torch.is_autocast_enabled(h.device.type) or h.dtype != torch.float32
            or weight.shape[0] < 2 or h.numel() < _MIN_ROWS * h.shape[-1]):
        return F.linear(h, weight).argmax(-1)
    lead, d = h.shape[:-1], h.shape[-1]
    flat = h.reshape(-1, d)
    weight_bf16, max_norm, backoff = _bf16_weight(weight)
    if backoff["skip"] > 0:  # recent probes on this weight lost: fp32 straight away
        backoff["skip"] -= 1
        if stats is not None:
            stats["rows"] = stats.get("rows", 0) + flat.shape[0]
            stats["rechecked"] = stats.get("rechecked", 0) + flat.shape[0]
        return F.linear(h, weight).argmax(-1)
    bound = 2 * error_coefficient(d) * max_norm  # per unit ||h||
    out = torch.empty(flat.shape[0], dtype=torch.long, device=h.device)
    unsure = []
    start, tile = 0, _PROBE_ROWS
    while start < flat.shape[0]:
        rows = flat[start : start + tile]
        top = F.linear(rows.to(torch.bfloat16), weight_bf16).topk(2, dim=-1)  # [R, 2] values, indices
        margin = (top.values[:, 0].float() - top.values[:, 1].float())
        safe = margin > bound * rows.norm(dim=-1) + _ABS_SLACK  # NaN margins are not safe
        out[start : start + rows.shape[0]] = top.indices[:, 0]
        unsure.append((~safe).nonzero().squeeze(-1) + start)
        start += rows.shape[0]
        if start == rows.shape[0]:  # the probe
            if unsure[0].numel() > _MAX_RECHECK * rows.shape[0]:  # lost: the rest in fp32, no gather
                backoff["losses"] += 1
                backoff["skip"] = min(2 ** backoff["losses"], _MAX_BACKOFF)
                out[start:] = F.linear(flat[start:], weight).argmax(-1)
                break
            backoff["losses"] = 0
        tile = _ROW_TILE
    recheck = torch.cat(unsure)
    if recheck.numel():
        out[recheck] = F.linear(flat[recheck], weight).argmax(-1)
    if stats is not None:
        stats["rows"] = stats.get("rows", 0) + flat.shape[0]
        stats["rechecked"] = stats.get("rechecked", 0) + int(recheck.numel()) + (flat.shape[0] - start)
    return out.reshape(lead)
