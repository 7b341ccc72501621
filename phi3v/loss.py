"""Chunked cross-entropy: loss over supervised tokens without materialising [B, T, V] fp32 logits."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_ce(lm_head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(h).float(), y, reduction="sum")


def chunked_ce(hidden: torch.Tensor, lm_head: nn.Module, target_index: torch.Tensor, targets: torch.Tensor,
               chunk: int = 2048) -> torch.Tensor:
    """Summed cross-entropy of the supervised tokens.

    hidden [B, T, D] (after the final norm); target_index [N]: flat b*T+t positions whose next token
    is supervised, targets [N]: those tokens (both from `data.training_inputs`, computed on the CPU,
    so nothing here reads a device value). Only these rows go through lm_head (answers are a small
    part of a VLM sample), in chunks under activation checkpointing: at most one chunk of fp32
    logits [chunk, V] exists at a time, also in backward.
    """
    n = target_index.shape[0]
    if n == 0:
        return hidden.sum() * 0.0                            # keeps the graph (and the optimizer) happy
    h = hidden.flatten(0, 1).index_select(0, target_index)  # [N, D]
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, lm_head, h[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
        else:
            total = total + _chunk_ce(lm_head, h[s:s + chunk], targets[s:s + chunk])
    return total
