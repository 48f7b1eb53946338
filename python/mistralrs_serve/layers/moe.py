"""Mixture-of-experts feed-forward: a router scores every expert per token, the
top k SwiGLU experts run on it, and their outputs are summed by router weight.

Experts are stored stacked, one tensor per projection: gate and up as
(experts, inter, hidden), down as (experts, hidden, inter); 128 experts are
three tensors rather than 384. Gate and up stay apart (not fused as in the
dense MLP) because GGUF stores them apart and fusing would copy them at load.
A step's (token, expert) pairs are sorted by expert so that each chosen expert
runs one matmul per projection over just its tokens: no expert computes a token
that did not pick it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.layers.linear import AnyWeight


@dataclass(frozen=True)
class Routing:
    """How a family turns router logits into expert weights.

    Both families take the softmax over all experts in fp32 and keep the k
    largest; renormalising those k is the same as a softmax over the k chosen
    logits (Mixtral's original statement). Qwen3-MoE renormalises only with
    `norm_topk_prob` and casts the weights to the model dtype before scaling
    expert outputs; Mixtral always renormalises and scales in fp32.
    """

    num_experts: int
    top_k: int
    renormalize: bool
    fp32_weights: bool

    def __post_init__(self) -> None:
        check_expert_counts(self.num_experts, self.top_k)


def check_expert_counts(num_experts: int, top_k: int, names: tuple[str, str] = ("experts", "top_k")) -> None:
    """ModelLoadError unless 1 <= top_k <= num_experts; `names` are the settings to name."""
    if num_experts <= 0:
        raise ModelLoadError(f"{names[0]} must be > 0, got {num_experts}")
    if not 0 < top_k <= num_experts:
        raise ModelLoadError(
            f"{names[1]} = {top_k} must be between 1 and the number of experts ({names[0]} = {num_experts})"
        )


def route(logits: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (T, E) -> (weights (T, k), expert ids (T, k))."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, routing.top_k, dim=-1)
    if routing.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if routing.fp32_weights else weights.to(logits.dtype)), ids


def dense(w: AnyWeight, dtype: torch.dtype) -> torch.Tensor:
    """Any weight kind `Linear` accepts, as a plain tensor of `dtype`."""
    return w.to(dtype) if isinstance(w, torch.Tensor) else w.dequantize(dtype)


def stack_experts(parts: Sequence[AnyWeight], dtype: torch.dtype) -> torch.Tensor:
    """Per-expert matrices into one (experts, rows, cols) tensor, filled in place
    so that at most one expert's converted copy exists beside the result."""
    first = dense(parts[0], dtype)
    out = torch.empty((len(parts), *first.shape), dtype=dtype)
    out[0] = first
    for i, part in enumerate(parts[1:], start=1):
        out[i] = dense(part, dtype)
    return out


class SparseMoE:
    """x (T, hidden) -> (T, hidden): the routed sum of the chosen experts' SwiGLU."""

    def __init__(
        self,
        router: AnyWeight,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        routing: Routing,
        dtype: torch.dtype,
    ) -> None:
        self.router = dense(router, dtype)  # (E, hidden)
        self.gate, self.up = gate.to(dtype), up.to(dtype)  # (E, inter, hidden) each
        self.down = down.to(dtype)  # (E, hidden, inter)
        self.routing = routing
        _check_shapes(self.router, self.gate, self.up, self.down, routing.num_experts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # the per-expert loop is sized on the host: say so (the graph path then runs eagerly)
            # rather than fail inside the capture on the device-to-host copy
            raise RuntimeError("mixture-of-experts layers read their routing on the host: not capturable")
        weights, ids = route(F.linear(x, self.router), self.routing)
        flat_ids = ids.flatten()  # pair p = (token p // k, its (p % k)-th choice)
        order = torch.argsort(flat_ids, stable=True)
        tokens = order // self.routing.top_k
        grouped = x.index_select(0, tokens)  # (T * k, hidden), expert 0's tokens first
        counts = torch.bincount(flat_ids, minlength=self.routing.num_experts).tolist()
        out = torch.empty_like(grouped)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                h = grouped[rows]
                h = F.silu(F.linear(h, self.gate[expert])) * F.linear(h, self.up[expert])
                out[rows] = F.linear(h, self.down[expert])
                start += count
        scaled = (out * weights.flatten()[order].unsqueeze(1)).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, scaled)

    def to(self, device: torch.device) -> None:
        self.router = self.router.to(device)
        self.gate, self.up, self.down = self.gate.to(device), self.up.to(device), self.down.to(device)

    def decode_bytes(self) -> int:
        """Bytes one decode row reads: the router and its k experts."""
        per_expert = sum(t[0].numel() * t.element_size() for t in (self.gate, self.up, self.down))
        return self.router.numel() * self.router.element_size() + self.routing.top_k * per_expert


def _check_shapes(
    router: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, num_experts: int
) -> None:
    ok = (
        router.dim() == 2
        and gate.dim() == up.dim() == down.dim() == 3
        and {router.shape[0], gate.shape[0], up.shape[0], down.shape[0]} == {num_experts}
        and gate.shape == up.shape
        and router.shape[1] == gate.shape[2] == down.shape[1]
        and gate.shape[1] == down.shape[2]
    )
    if not ok:
        raise ModelLoadError(
            f"expert weights disagree with each other or the config ({num_experts} experts): router "
            f"{tuple(router.shape)}, gate {tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)}"
        )
