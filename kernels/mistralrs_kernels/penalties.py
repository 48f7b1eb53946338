"""Repetition, presence and frequency penalties and logit bias on the GPU,
in the Rust sampler's order and semantics: repetition (CTRL style: divide a
positive logit, multiply a negative one) once per token seen in the prompt
or the output; then `frequency * count + presence` off every token the
output holds; then the bias. One pass over the logits, in place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs_kernels._checks import check_tensor, need, same_device


@triton.jit
def _apply_penalties_kernel(
    logits_ptr, counts_ptr, seen_ptr, bias_ptr, rep_ptr, pres_ptr, freq_ptr, vocab, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < vocab
    offs = row * vocab + cols
    x = tl.load(logits_ptr + offs, mask=inside, other=0.0)
    count = tl.load(counts_ptr + offs, mask=inside, other=0).to(tl.float32)
    seen = (tl.load(seen_ptr + offs, mask=inside, other=0) != 0) | (count > 0)
    rep = tl.load(rep_ptr + row)
    x = tl.where(seen, tl.where(x > 0, x / rep, x * rep), x)
    x = x - tl.load(freq_ptr + row) * count - tl.where(count > 0, tl.load(pres_ptr + row), 0.0)
    x = x + tl.load(bias_ptr + offs, mask=inside, other=0.0)
    tl.store(logits_ptr + offs, x, mask=inside)


def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    prompt_seen: torch.Tensor,
    bias: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> None:
    """In place: logits (B, V) float32; output_counts (B, V) int32 (how often
    each token is in the output so far); prompt_seen (B, V) bool (token in the
    prompt); bias (B, V) float32; repetition/presence/frequency (B,) float32."""
    check_tensor("logits", logits, ndim=2, dtypes=(torch.float32,))
    rows, vocab = logits.shape
    for name, t, dtype in (
        ("output_counts", output_counts, torch.int32),
        ("prompt_seen", prompt_seen, torch.bool),
        ("bias", bias, torch.float32),
    ):
        check_tensor(name, t, ndim=2, dtypes=(dtype,))
        need(t.shape == logits.shape, f"{name} {tuple(t.shape)} must match logits {tuple(logits.shape)}")
    for name, t in (("repetition", repetition), ("presence", presence), ("frequency", frequency)):
        check_tensor(name, t, ndim=1, dtypes=(torch.float32,))
        need(
            t.shape[0] == rows,
            f"{name} {tuple(t.shape)} needs one entry per row of logits {tuple(logits.shape)}",
        )
    same_device(
        logits=logits, output_counts=output_counts, prompt_seen=prompt_seen, bias=bias, repetition=repetition
    )
    block = 1024
    if rows and vocab:
        _apply_penalties_kernel[(rows, triton.cdiv(vocab, block))](
            logits, output_counts, prompt_seen, bias, repetition, presence, frequency, vocab, BLOCK=block
        )


def penalty_tensors(
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    logit_bias: list[dict[int, float]],
    vocab: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense per-row inputs of `apply_penalties` from token lists: only the
    ids cross to the device; counts and masks are built there."""
    rows = len(prompt_ids)
    counts = torch.zeros(rows, vocab, dtype=torch.int32, device=device)
    seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
    bias = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
    for i in range(rows):
        if output_ids[i]:
            ids = torch.tensor(output_ids[i], dtype=torch.int64, device=device)
            counts[i].scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        if prompt_ids[i]:
            seen[i, torch.tensor(prompt_ids[i], dtype=torch.int64, device=device)] = True
        if logit_bias[i]:
            keys = torch.tensor(list(logit_bias[i]), dtype=torch.int64, device=device)
            bias[i, keys] = torch.tensor(list(logit_bias[i].values()), dtype=torch.float32, device=device)
    return counts, seen, bias
