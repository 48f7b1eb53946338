"""Sampling where the logits are, on a GPU: the Triton penalty, bitmask and
sampling kernels (and torch.topk for top logprobs) give what the Rust sampler
gives on the host; only ids and a few floats cross to the host. Seeded draws are
reproducible, on a different random stream than the host sampler's. Rows with
DRY are left to the host sampler."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from mistralrs_serve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from mistralrs_serve import _native
    from mistralrs_serve.engine.sequence import Sequence


class SampledTokens(NamedTuple):
    """One sampled token per row with its logprobs (NaN where not asked for) and
    the top entries (padded with -1 / NaN to the widest row's count)."""

    token_ids: np.ndarray  # (rows,) int64
    logprobs: np.ndarray  # (rows,) float32
    top_ids: np.ndarray  # (rows, width) int64
    top_logprobs: np.ndarray  # (rows, width) float32


def can_sample_on_device(params: SamplingParams) -> bool:
    """Penalties, logit bias, temperature, top-k, top-p and min-p run on the device; DRY does not."""
    return params.dry_multiplier == 0.0


def sample_on_device(
    logits: torch.Tensor,
    rows: list[int],
    seqs: list[Sequence],
    bitmask: np.ndarray | None,
    histories: _native.Scheduler,
) -> SampledTokens:
    """Sample row rows[i] of the logits for seqs[i]; histories: where each
    sequence's prompt and generated ids live, read only when penalties are on."""
    from mistralrs_kernels import triton_ops

    dev = logits.device
    x = logits.index_select(0, torch.tensor(rows, device=dev)).float().contiguous()
    params = [s.request.params for s in seqs]
    if any(_has_penalties(p) for p in params):
        _apply_penalties(x, seqs, params, histories)
    if bitmask is not None:
        triton_ops.apply_token_bitmask(x, torch.from_numpy(bitmask.view(np.int32)).to(dev))
    temps = [p.temperature for p in params]
    ids_t, lps_t = triton_ops.sample(
        x,
        _column(temps, torch.float32, dev),
        _column([max(p.top_k, 0) for p in params], torch.int32, dev),
        _column([p.top_p for p in params], torch.float32, dev),
        _column([p.min_p for p in params], torch.float32, dev),
        _column([s.native.seed & (2**63 - 1) for s in seqs], torch.int64, dev),
        _column([s.num_output_tokens for s in seqs], torch.int64, dev),
    )
    top_ids, top_lps = _top_logprobs(x, params, temps)
    lps = lps_t.cpu().numpy()
    lps[[i for i, p in enumerate(params) if not p.logprobs]] = np.nan
    return SampledTokens(ids_t.cpu().numpy(), lps, top_ids, top_lps)


def _column(values: list[float] | list[int], dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=dev)


def _has_penalties(params: SamplingParams) -> bool:
    return bool(
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
        or params.logit_bias
    )


def _apply_penalties(
    x: torch.Tensor, seqs: list[Sequence], params: list[SamplingParams], histories: _native.Scheduler
) -> None:
    from mistralrs_kernels import triton_ops

    dev = x.device
    prompts, outputs = [], []
    for s, p in zip(seqs, params, strict=True):
        prompt, output = histories.history(s.seq_id)
        prompts.append(prompt.tolist() if p.repetition_penalty != 1.0 else [])
        outputs.append(output.tolist())
    counts, seen, bias = triton_ops.penalty_tensors(
        prompts, outputs, [p.logit_bias for p in params], x.shape[1], dev
    )
    triton_ops.apply_penalties(
        x,
        counts,
        seen,
        bias,
        _column([p.repetition_penalty for p in params], torch.float32, dev),
        _column([p.presence_penalty for p in params], torch.float32, dev),
        _column([p.frequency_penalty for p in params], torch.float32, dev),
    )


def _top_logprobs(
    x: torch.Tensor, params: list[SamplingParams], temps: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """The top entries of log_softmax(x / temperature) each row asked for."""
    width = max((p.top_logprobs for p in params if p.logprobs), default=0)
    top_ids = np.full((len(params), width), -1, dtype=np.int64)
    top_lps = np.full((len(params), width), np.nan, dtype=np.float32)
    if width:
        scale = _column([1.0 / t if t > 0 else 1.0 for t in temps], torch.float32, x.device)
        values, indices = torch.log_softmax(x * scale[:, None], dim=-1).topk(width, dim=-1)
        top_ids[:], top_lps[:] = indices.cpu().numpy(), values.cpu().numpy()
        for i, p in enumerate(params):
            keep = p.top_logprobs if p.logprobs else 0
            top_ids[i, keep:], top_lps[i, keep:] = -1, np.nan
    return top_ids, top_lps
