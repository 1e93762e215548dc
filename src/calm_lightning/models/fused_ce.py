"""Output projection + cross-entropy in row chunks, never materialising the full logits tensor.

The autoencoder's reconstruction loss projects every token state onto a V-row output matrix
(V = 8192 here): at 16k tokens the fp32 logits alone are 537 MB, and the unfused path writes them,
their log-softmax, a zero-filled gradient and the log-softmax gradient, each a full pass over memory
that costs as much as the projection's matmuls on a 2-core CPU. Here each chunk of rows is projected,
reduced to its loss (and argmax, on request), and (when a gradient is wanted) turned into its logits' gradient
softmax - onehot at once, while the chunk is still in cache; the gradients of the states and of the
output matrix are accumulated chunk by chunk and returned by ``backward`` scaled by the incoming
gradient. Same matmuls as the unfused path (forward, d states, d weight), no recomputation.

Plain PyTorch; under CPU/CUDA autocast the matmuls run in the autocast dtype and the softmax in fp32,
as ``F.cross_entropy(F.linear(h, w).float(), t)`` does under autocast.
"""

from __future__ import annotations

import contextlib

import torch

# Rows per chunk: about 2^21 logits (8 MB in fp32), so a chunk's softmax passes stay in cache. Measured on
# the 2-core AMD EPYC at V = 8192, 16k rows, fwd+bwd (ms, min of 7): fp32 1750 / 1487 / 1609 / 1750 at
# 128 / 256 / 384 / 512 rows, bf16 autocast 729 / 523 / 560 / 539 (unfused: 2152 fp32, 2026 bf16).
CHUNK_ELEMENTS = 1 << 21


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk for a V-word output matrix (CHUNK_ELEMENTS logits, at least 16 rows)."""
    return max(16, CHUNK_ELEMENTS // max(1, vocab_size))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _autocast_off(device: str):
    """Autocast disabled on ``device``; a no-op where the device has no autocast (meta: FLOP counting)."""
    if torch.amp.is_autocast_available(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, compute_dtype, grad_enabled, with_pred):
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        with _autocast_off(h.device.type):
            hc, wc = h.to(compute_dtype), weight.to(compute_dtype)
            n = h.shape[0]
            acc = torch.float64 if compute_dtype == torch.float64 else torch.float32  # softmax / loss dtype
            total = torch.zeros((), dtype=acc, device=h.device)
            pred = torch.empty(n if with_pred else 0, dtype=torch.long, device=h.device)
            grad_h = torch.empty(h.shape, dtype=compute_dtype, device=h.device) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if want_w else None
            for start in range(0, n, chunk_rows):
                stop = min(start + chunk_rows, n)
                hs, ts = hc[start:stop], targets[start:stop]
                logits = hs @ wc.T  # [n_c, V], compute dtype
                logp = torch.log_softmax(logits.to(acc), dim=-1)  # [n_c, V] fp32 (fp64 for fp64 inputs)
                del logits
                if with_pred:
                    pred[start:stop] = logp.argmax(-1)
                rows = torch.arange(stop - start, device=h.device)
                total -= logp[rows, ts].sum()
                if want_h or want_w:
                    g = logp.exp_()  # softmax, in place
                    g[rows, ts] -= 1.0  # d loss_sum / d logits
                    g = g.to(compute_dtype)
                    if want_h:
                        grad_h[start:stop] = g @ wc
                    if want_w:
                        grad_w += (g.T @ hs).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.mark_non_differentiable(pred)
        return total, pred

    @staticmethod
    def backward(ctx, grad_total, _grad_pred):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_total).to(h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_total).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    with_pred: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the logits ``h @ weight.T`` (and their argmax), computed chunk-wise.

    h: [N, d] states; weight: [V, d] output matrix; targets: [N] ids in [0, V); chunk_rows: rows per
    chunk (None: ``default_chunk_rows(V)``).
    Returns (loss_sum: scalar fp32 (fp64 for fp64 inputs), the sum over rows of -log softmax(h w^T)[target];
    pred: [N] long, each row's argmax token (empty unless ``with_pred``), no gradient).
    Equals ``F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum")`` and its gradients.
    The gradients are computed in the forward pass when grad mode is on and h or weight requires one.
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0])
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"expected h [N, d] and weight [V, d], got {tuple(h.shape)} and {tuple(weight.shape)}")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"expected targets [{h.shape[0]}], got {tuple(targets.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _LinearCrossEntropy.apply(h, weight, targets, int(chunk_rows), _compute_dtype(h),
                                     torch.is_grad_enabled(), bool(with_pred))
