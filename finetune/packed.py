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

__all__ = ["PACKED_ATTENTION", "linear_cross_entropy", "loss_sum"]

PACKED_ATTENTION = "finetune_packed_sdpa"


def loss_sum(model: Any, batch: Batch, device: torch.device) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's learned tokens."""
    targets = torch.tensor(batch.targets, device=device)
    learned = targets != IGNORE_INDEX
    inputs: dict[str, Any] = {
        "input_ids": torch.tensor([batch.input_ids], device=device),
        "position_ids": torch.tensor([batch.position_ids], device=device),
        "cu_seq_lens_q": torch.tensor(batch.boundaries),  # read on the host by _packed_attention
        "shared_prefix_length": batch.shared_prefix,
        "use_cache": False,
    }
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=base.dtype == torch.bfloat16):
        head = _plain_head(base)
        if head is None:  # a head with a bias or logit scaling: the model's own logits
            output = model(**inputs, logits_to_keep=learned.unsqueeze(0))
            logits = output.logits.reshape(-1, output.logits.shape[-1])
            return F.cross_entropy(logits.float(), targets[learned], reduction="sum")
        hidden = base.get_decoder()(**inputs).last_hidden_state[0, learned]
        return linear_cross_entropy(hidden, head.weight, targets[learned])


def _plain_head(base: Any) -> torch.nn.Linear | None:
    """The output projection when the logits are nothing but hidden @ weight^T (Llama, Qwen, SmolLM)."""
    head = base.get_output_embeddings()
    scaled = any(
        getattr(base.config, name, None) not in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    plain = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
    return head if plain and not scaled and hasattr(base, "get_decoder") else None


# Rows of logits materialized at once by linear_cross_entropy: 2**24 floats (64 MiB) at most.
_LOGITS_PER_CHUNK = 1 << 24


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight^T, targets_i), chunk by chunk, the gradient found in the same pass.

    The logits of a chunk are computed in fp32, turned into log-probabilities, then in place into
    softmax - onehot, which times `weight` is the hidden rows' gradient: no logits tensor is kept for
    backward (memory: one chunk, not all rows).  `weight` is frozen (the vocabulary projection).
    """
    return _LinearCrossEntropy.apply(
        hidden, weight, targets, torch.is_grad_enabled() and hidden.requires_grad
    )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, needs_grad: bool
    ) -> torch.Tensor:
        rows = max(1, _LOGITS_PER_CHUNK // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if needs_grad else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                part = hidden[start : start + rows].to(weight.dtype)
                target = targets[start : start + rows]
                log_probs = torch.log_softmax((part @ weight.t()).float(), dim=-1)
                total -= log_probs.gather(1, target.unsqueeze(1)).sum()
                if grad is not None:  # d loss / d logits = softmax - onehot, in place of the log-probs
                    probs = log_probs.exp_()
                    probs.scatter_add_(1, target.unsqueeze(1), probs.new_full((len(target), 1), -1.0))
                    grad[start : start + rows] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


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
    sizes = [end - start for start, end in pairwise(bounds)]
    # split, not slicing: its backward is one cat, where each slice's backward zero-fills a full-size tensor
    queries, keys_, values_ = (t.split(sizes, dim=2) for t in (query, key, value))
    outputs = []
    for index, (start, end) in enumerate(pairwise(bounds)):
        keys, values, mask = keys_[index], values_[index], None
        if prefix and start >= prefix:  # an example continuing the shared prefix (segment 0)
            keys = torch.cat([keys_[0], keys], dim=2)
            values = torch.cat([values_[0], values], dim=2)
            mask = causal_lower_right(end - start, prefix + end - start)  # all of the prefix, then causal
        outputs.append(
            F.scaled_dot_product_attention(
                queries[index],
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
