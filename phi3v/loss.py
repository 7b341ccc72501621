"""Chunked cross-entropy: loss over supervised tokens without materialising [B, T, V] fp32 logits."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_ce(lm_head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(h).float(), y, reduction="sum")


def chunked_ce(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
               chunk: int = 2048) -> tuple[torch.Tensor, int]:
    """Sum of shifted CE over labels != -100, and the number of those tokens.

    hidden [B, T, D] (after the final norm), labels [B, T]. Only supervised positions are gathered
    (answers are a small part of a VLM sample), then lm_head + fp32 CE run in chunks under
    activation checkpointing, so at most one chunk of logits exists at a time, also in backward.
    """
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100                                   # [B, T-1]
    h = hidden[:, :-1][keep]                                 # [N, D] supervised positions only
    y = targets[keep]                                        # [N]
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0                         # keeps the graph (and DDP/ZeRO) happy
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, lm_head, h[s:s + chunk], y[s:s + chunk], use_reentrant=False)
        else:
            total = total + _chunk_ce(lm_head, h[s:s + chunk], y[s:s + chunk])
    return total, n

