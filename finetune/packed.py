"""The forward pass over a packed row: attention per example, and logits only where a label is learned.

finetune.batches.pack lays a micro-batch's examples end to end in one row (no padding) and notes where each
begins; this module is the model's side of that contract.  `loss_sum` passes the boundaries and the length
of the prompt prefix the examples share to the attention implementation registered here under
PACKED_ATTENTION, which runs causal sdpa per example (plus the shared prefix), so no compute is spent on
padding or across examples, and nothing of size tokens x tokens is ever built.  Both are exact: the same
loss and gradients as running each example alone (tests/unit/test_trainer.py holds them to it).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

from finetune.batches import Batch
from finetune.chat_template import IGNORE_INDEX

__all__ = ["PACKED_ATTENTION", "loss_sum"]

PACKED_ATTENTION = "finetune_packed_sdpa"


def loss_sum(model: Any, batch: Batch, device: torch.device) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's learned tokens."""
    targets = torch.tensor(batch.targets, device=device)
    learned = targets != IGNORE_INDEX
    output = model(
        input_ids=torch.tensor([batch.input_ids], device=device),
        position_ids=torch.tensor([batch.position_ids], device=device),
        cu_seq_lens_q=torch.tensor(batch.boundaries),  # read on the host by _packed_attention
        shared_prefix_length=batch.shared_prefix,
        logits_to_keep=learned.unsqueeze(0),  # project onto the vocabulary only where a label is learned
        use_cache=False,
    )
    logits = output.logits.reshape(-1, output.logits.shape[-1])
    return F.cross_entropy(logits.float(), targets[learned], reduction="sum")


def _packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    shared_prefix_length: int = 0,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """Causal sdpa per packed segment: (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out.

    A segment sees itself causally and, when the batch has one (finetune.batches.Batch), the shared prefix.
    The model builds no mask for this implementation (transformers skips mask creation for names it does not
    know), so nothing of size tokens x tokens exists.
    """
    if attention_mask is not None:
        raise ValueError("packed attention takes no attention mask: pack examples instead of padding them")
    bounds = [0, query.shape[2]] if cu_seq_lens_q is None else cu_seq_lens_q.tolist()
    prefix = shared_prefix_length
    outputs = []
    for start, end in pairwise(bounds):
        keys, values, mask = key[:, :, start:end], value[:, :, start:end], None
        if prefix and start >= prefix:  # an example continuing the shared prefix
            keys = torch.cat([key[:, :, :prefix], keys], dim=2)
            values = torch.cat([value[:, :, :prefix], values], dim=2)
            mask = causal_lower_right(end - start, prefix + end - start)  # all of the prefix, then causal
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                keys,
                values,
                attn_mask=mask,
                dropout_p=dropout,
                scale=scaling,
                is_causal=mask is None,
                enable_gqa=True,
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
