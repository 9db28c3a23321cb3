"""The model forward pass the engine runs: decoder-only Llama-family models over a slot KV cache.

Why not `model.generate`: it decodes one batch that starts and ends together, and its per-step machinery
(logits processors, cache objects, stopping criteria) costs as much as the matmuls for a small model on a CPU.
This runner reads the weights of a loaded transformers model once, fuses q/k/v and gate/up into single
matmuls, and runs one *step* over a mix of

  - decode rows: one new token for each running sequence (attending to its slot in the KV cache), and
  - prefill segments: a chunk of prompt tokens for sequences that just joined,

so a joining request's prompt rides along the same weight reads as the running batch (continuous batching
with chunked prefill).  Each row may carry its own LoRA adapter; deltas are applied per adapter group.
Optionally a weight-only quantized copy of the weights serves the steps with few rows (quantized.py).

Devices: on the CPU the KV cache grows with the longest sequence (memory is shared with the rest of the
machine) and decode attention is fp32 batched matmuls (faster than CPU SDPA, measured below).  On CUDA the
weights, the KV cache (allocated in full at start-up, as the GPU is the engine's) and the adapters live on
the GPU, and attention is torch's SDPA (flash / memory-efficient kernels) in the weights' dtype; the int4 path
is CPU-only and never used there.

Supported: LlamaForCausalLM and its relatives (Mistral, Qwen2 with qkv bias, Qwen3 with q/k norms).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from gateway.engine.local.lora import LoraAdapter
from gateway.engine.local.quantized import QuantizedWeight, Scheme, quantize

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelRunner", "PrefillSegment", "StepBatch", "UnsupportedModel"]

SUPPORTED_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)


class UnsupportedModel(ValueError):
    pass


@dataclass
class PrefillSegment:
    slot: int
    start: int  # position of the first token (0 unless the prompt is prefilled in chunks)
    token_ids: list[int]
    adapter: LoraAdapter | None = None
    wants_logits: bool = True  # only the last chunk of a prompt needs next-token logits


@dataclass
class StepBatch:
    decode_slots: list[int] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    decode_adapters: list[LoraAdapter | None] = field(default_factory=list)
    prefills: list[PrefillSegment] = field(default_factory=list)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    compact: dict[str, QuantizedWeight] = field(default_factory=dict)  # name -> quantized copy


class ModelRunner:
    """Owns the weights and the KV cache.  Not thread-safe: one engine thread calls it."""

    def __init__(
        self,
        model: Any,
        *,
        max_slots: int,
        max_model_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        quantization: Scheme | None = None,
        quantized_max_rows: int = 16,
    ) -> None:
        config = model.config
        arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        if type(model).__name__ not in SUPPORTED_ARCHITECTURES and arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(f"architecture {arch} is not supported by the local engine")
        self.config = config
        # Weights and KV cache in `dtype` (bf16 halves the bytes each decode step reads; norms, rotary and
        # the residual stream stay fp32 for accuracy).
        self.dtype = dtype or next(model.parameters()).dtype
        # The model may be loaded on the CPU and served from the GPU: its weights are copied layer by layer,
        # so the GPU never holds two copies of a layer's weights at once.
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.on_cuda = self.device.type == "cuda"
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        self.max_slots = max_slots
        self.max_model_len = max_model_len
        inner = model.model
        # a copy: moving the model's own rotary module would move it under the caller's model too
        self.rotary = copy.deepcopy(inner.rotary_emb).to(self.device)
        self.embed = inner.embed_tokens.weight.detach().to(device=self.device, dtype=self.dtype)
        self.final_norm = inner.norm.weight.detach().to(device=self.device, dtype=torch.float32)
        tied = model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
        self.lm_head = (
            self.embed if tied else model.lm_head.weight.detach().to(device=self.device, dtype=self.dtype)
        )
        self.layers = [self._fuse(layer, self.dtype, self.device) for layer in inner.layers]
        self.quantization = quantization
        self.quantized_max_rows = quantized_max_rows if quantization else 0
        if quantization:
            if self.dtype not in (torch.bfloat16, torch.float32) or self.device.type != "cpu":
                raise UnsupportedModel("quantized decode weights need bfloat16 or float32 weights on the CPU")
            for fused in self.layers:
                for name in ("qkv", "o", "gate_up", "down"):
                    compact = quantize(getattr(fused, name), quantization)
                    if compact is not None:
                        fused.compact[name] = compact
            # The vocabulary projection stays dense: it picks the token, and measured on the default model
            # a per-row int8 head triples the KL to fp32 (int4 layers alone match bf16's) for 10% speed.
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv_heads * self.head_dim
        self.capacity = 0
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        # CUDA: the whole cache now, so a cache that cannot fit fails at start-up, never mid-request
        self._grow(max_model_len if self.on_cuda else min(256, max_model_len))

    @staticmethod
    def _fuse(layer: Any, dtype: torch.dtype, device: torch.device) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp

        def weights(*tensors: torch.Tensor) -> torch.Tensor:
            joined = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
            return joined.detach().to(device=device, dtype=dtype).contiguous()

        def norm(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().to(device=device, dtype=torch.float32)

        bias = None
        if attn.q_proj.bias is not None:
            bias = weights(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)
        return _Layer(
            input_norm=norm(layer.input_layernorm.weight),
            qkv=weights(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
            qkv_bias=bias,
            o=weights(attn.o_proj.weight),
            post_norm=norm(layer.post_attention_layernorm.weight),
            gate_up=weights(mlp.gate_proj.weight, mlp.up_proj.weight),
            down=weights(mlp.down_proj.weight),
            q_norm=norm(attn.q_norm.weight) if hasattr(attn, "q_norm") else None,
            k_norm=norm(attn.k_norm.weight) if hasattr(attn, "k_norm") else None,
        )

    # -- KV cache ------------------------------------------------------------------------------------

    # Every method that creates or updates the cache runs in inference mode whoever calls it, so the cache
    # is always made of inference tensors and is only ever updated where that is allowed (scheduler.py).

    @torch.inference_mode()
    def _grow(self, capacity: int) -> None:
        capacity = min(max(capacity, self.capacity), self.max_model_len)
        if capacity == self.capacity:
            return
        shape = (self.max_slots, self.n_kv_heads, capacity, self.head_dim)
        if not self.capacity:
            self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
            self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        else:
            # one layer at a time, each old tensor let go before the next new one is made: growing peaks at
            # the new cache plus one layer of the old, not both caches whole (what sizing.py budgets for)
            for cache in (self.k_cache, self.v_cache):
                for index, old in enumerate(cache):
                    new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                    new[:, :, : self.capacity].copy_(old)
                    cache[index] = new
                    del old
        self.capacity = capacity

    def ensure_capacity(self, length: int) -> None:
        if length > self.capacity:
            target = self.capacity
            while target < length:
                target *= 2
            self._grow(target)

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's cache to another slot (the engine keeps running slots dense)."""
        for cache in self.k_cache + self.v_cache:
            cache[dst, :, :length].copy_(cache[src, :, :length])

    # -- one step ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, batch: StepBatch) -> torch.Tensor:
        """Run one forward; returns next-token logits, decode rows first, then one row per prefill
        segment that wants logits."""
        n_dec = len(batch.decode_slots)
        token_ids = list(batch.decode_tokens)
        positions = list(batch.decode_positions)
        adapters: list[LoraAdapter | None] = list(batch.decode_adapters)
        for seg in batch.prefills:
            token_ids.extend(seg.token_ids)
            positions.extend(range(seg.start, seg.start + len(seg.token_ids)))
            adapters.extend([seg.adapter] * len(seg.token_ids))
        longest = max([p + 1 for p in positions], default=0)
        self.ensure_capacity(longest)

        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        x = self.embed[ids].float()  # the residual stream stays fp32; weights and KV cache may be bf16
        cos, sin = self.rotary(x, pos.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, hd]
        groups = _adapter_groups(adapters, self.device)
        dec_slots = torch.tensor(batch.decode_slots, dtype=torch.long, device=self.device)
        dec_pos = pos[:n_dec]
        # the longest decode row's context, from the host's list (a .max() of a GPU tensor would sync)
        dec_len = max(batch.decode_positions) + 1 if n_dec else 0
        dec_bias = self._decode_bias(dec_pos, dec_len) if n_dec else None
        # running slots are kept dense by the scheduler, so the cache rows are usually a view, not a gather
        dense = batch.decode_slots == list(range(n_dec))
        compact = len(token_ids) <= self.quantized_max_rows  # few rows: bound by weight bytes, not FLOPs

        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), layer.input_norm, self.eps).to(self.dtype)
            qkv = _linear(h, layer, "qkv", compact)
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            if groups:
                _apply_lora(
                    qkv,
                    h,
                    groups,
                    index,
                    ("q_proj", "k_proj", "v_proj"),
                    (self.q_size, self.kv_size, self.kv_size),
                )
            # q and k heads side by side: one fp32 rotary pass for both (fewer ops per layer: the engine
            # thread needs the GIL between ops, so op count is step time under load)
            heads = self.n_heads + self.n_kv_heads
            qk = qkv[:, : self.q_size + self.kv_size].reshape(-1, heads, self.head_dim).float()
            v = qkv[:, self.q_size + self.kv_size :].reshape(-1, self.n_kv_heads, self.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                qn, kn = qk.split((self.n_heads, self.n_kv_heads), dim=1)
                qk = torch.cat(
                    [
                        F.rms_norm(qn, (self.head_dim,), layer.q_norm, self.eps),
                        F.rms_norm(kn, (self.head_dim,), layer.k_norm, self.eps),
                    ],
                    dim=1,
                )
            q, k = _rope(qk, cos, sin).to(self.dtype).split((self.n_heads, self.n_kv_heads), dim=1)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            if n_dec == 1:  # basic indexing: a plain copy instead of an index_put
                slot, position = batch.decode_slots[0], batch.decode_positions[0]
                k_cache[slot, :, position] = k[0]
                v_cache[slot, :, position] = v[0]
            elif n_dec:
                k_cache[dec_slots, :, dec_pos] = k[:n_dec]
                v_cache[dec_slots, :, dec_pos] = v[:n_dec]
            if not batch.prefills and dec_bias is not None:
                attn = self._decode_attention(q, k_cache, v_cache, dec_slots, dec_bias, dense)
                attn_flat = attn.reshape(-1, self.q_size)
                x = self._finish_layer(x, attn_flat, layer, index, groups, compact)
                continue
            attn = torch.empty((q.shape[0], self.n_heads, self.head_dim), dtype=q.dtype, device=q.device)
            if dec_bias is not None:
                attn[:n_dec] = self._decode_attention(q[:n_dec], k_cache, v_cache, dec_slots, dec_bias, dense)
            offset = n_dec
            for seg in batch.prefills:
                end = offset + len(seg.token_ids)
                stop = seg.start + len(seg.token_ids)
                k_cache[seg.slot, :, seg.start : stop] = k[offset:end].transpose(0, 1)
                v_cache[seg.slot, :, seg.start : stop] = v[offset:end].transpose(0, 1)
                attn[offset:end] = self._prefill_attention(
                    q[offset:end], k_cache, v_cache, seg.slot, seg.start, stop
                )
                offset = end
            x = self._finish_layer(x, attn.view(-1, self.q_size), layer, index, groups, compact)

        rows = list(range(n_dec))
        offset = n_dec
        for seg in batch.prefills:
            offset += len(seg.token_ids)
            if seg.wants_logits:
                rows.append(offset - 1)
        last = x[rows] if len(rows) != x.shape[0] else x
        last = F.rms_norm(last, (last.shape[-1],), self.final_norm, self.eps).to(self.dtype)
        return F.linear(last, self.lm_head).float()

    def _finish_layer(
        self,
        x: torch.Tensor,
        attn_flat: torch.Tensor,
        layer: _Layer,
        index: int,
        groups: list[tuple[LoraAdapter, torch.Tensor]],
        compact: bool,
    ) -> torch.Tensor:
        """The layer after attention: output projection, residual, MLP, residual (x is updated in place)."""
        out = _linear(attn_flat, layer, "o", compact)
        if groups:
            _apply_lora(out, attn_flat, groups, index, ("o_proj",), (out.shape[-1],))
        x += out  # fp32 residual stream += bf16 projection, computed in fp32
        h = F.rms_norm(x, (x.shape[-1],), layer.post_norm, self.eps).to(self.dtype)
        gate_up = _linear(h, layer, "gate_up", compact)
        inter = layer.down.shape[1]
        if groups:
            _apply_lora(gate_up, h, groups, index, ("gate_proj", "up_proj"), (inter, inter))
        gate, up = gate_up.split((inter, inter), dim=-1)
        act = F.silu(gate) * up
        down = _linear(act, layer, "down", compact)
        if groups:
            _apply_lora(down, act, groups, index, ("down_proj",), (down.shape[-1],))
        x += down
        return x

    def _decode_bias(self, dec_pos: torch.Tensor, length: int) -> torch.Tensor:
        """Attention bias [B, 1, 1, L] over L = the longest row's context: on the CPU additive (0 where a row
        may look, -inf past its own position), on CUDA a boolean mask (True where it may look) for SDPA."""
        keys = torch.arange(length, device=self.device)
        hidden = keys.unsqueeze(0) > dec_pos.unsqueeze(1)  # [B, L]
        if self.on_cuda:
            return (~hidden)[:, None, None, :]
        bias = torch.zeros(hidden.shape, dtype=torch.float32, device=self.device)
        return bias.masked_fill_(hidden, -torch.inf)[:, None, None, :]

    def _decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        bias: torch.Tensor,
        dense: bool,
    ) -> torch.Tensor:
        length = bias.shape[-1]
        if dense:
            keys, values = k_cache[: q.shape[0], :, :length], v_cache[: q.shape[0], :, :length]
        else:
            keys, values = k_cache[slots, :, :length], v_cache[slots, :, :length]
        rows, group = q.shape[0], self.n_heads // self.n_kv_heads
        grouped = q.view(rows, self.n_kv_heads, group, self.head_dim)
        if self.on_cuda:
            # The query heads that share a KV head ride as that head's query rows: one SDPA call, no GQA
            # expansion, in the cache's dtype with fp32 accumulation; a lone row needs no mask (flash).
            mask = bias if rows > 1 else None
            out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
            return out.reshape(rows, self.n_heads, self.head_dim)
        if rows == 1 and length <= _SHORT_CONTEXT:  # no mask needed, and one SDPA call is fewest ops
            gqa = self.n_kv_heads != self.n_heads
            return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, enable_gqa=gqa).squeeze(2)
        # fp32 batched matmuls over the grouped heads (head h reads KV head h // group, as transformers'
        # repeat_kv does) never expand the KV heads and beat CPU SDPA, per decode step on the default model:
        # 8 rows (with a mask) at ~40 tokens of context 36 -> 27 ms, at ~1500 tokens 225 -> 88 ms; one row
        # at ~300 tokens 19.9 -> 14.3 ms, at ~1500 tokens 38 -> 24 ms (at ~60 tokens SDPA wins, 14 vs 18 ms).
        scores = torch.matmul(grouped.float(), keys.float().transpose(-1, -2)) * self.head_dim**-0.5 + bias
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, values.float()).to(q.dtype)
        return out.reshape(rows, self.n_heads, self.head_dim)

    def _prefill_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, start: int, stop: int
    ) -> torch.Tensor:
        keys = k_cache[slot : slot + 1, :, :stop]
        values = v_cache[slot : slot + 1, :, :stop]
        query = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, hd]
        gqa = self.n_kv_heads != self.n_heads
        if self.on_cuda:
            # KV heads expanded (a prompt chunk's worth, small) so flash / memory-efficient kernels take it
            # whatever their GQA support; a later chunk is causal from the lower right, never a dense mask.
            if gqa:
                group = self.n_heads // self.n_kv_heads
                keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            if start == 0:
                out = F.scaled_dot_product_attention(query, keys, values, is_causal=True)
            else:
                bias = causal_lower_right(stop - start, stop)
                out = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias)
            return out[0].transpose(0, 1)
        if start == 0:
            out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=gqa)
        else:
            rows = torch.arange(start, stop, device=self.device).unsqueeze(1)
            mask = torch.arange(stop, device=self.device).unsqueeze(0) <= rows
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=gqa)
        return out[0].transpose(0, 1)


_SHORT_CONTEXT = 128  # a lone decode row up to this many tokens of context uses SDPA (measured crossover)


def _linear(x: torch.Tensor, layer: _Layer, name: str, compact: bool) -> torch.Tensor:
    quantized = layer.compact.get(name) if compact else None
    if quantized is None:
        return F.linear(x, getattr(layer, name))
    if x.dtype == torch.bfloat16:
        return quantized.matmul(x)
    # fp32 weights (a CPU without native bf16): the packed kernels take bf16 activations; a few rows' worth
    # of rounding, while the step reads a quarter (int4) of the weight bytes the fp32 copy would
    return quantized.matmul(x.to(torch.bfloat16)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _adapter_groups(
    adapters: list[LoraAdapter | None], device: torch.device
) -> list[tuple[LoraAdapter, torch.Tensor]]:
    """Row indices per adapter (on the runner's device), for the rows that use one."""
    if not any(a is not None for a in adapters):
        return []
    rows: dict[int, tuple[LoraAdapter, list[int]]] = {}
    for row, adapter in enumerate(adapters):
        if adapter is not None:
            rows.setdefault(id(adapter), (adapter, []))[1].append(row)
    return [(adapter, torch.tensor(idx, dtype=torch.long, device=device)) for adapter, idx in rows.values()]


def _apply_lora(
    out: torch.Tensor,
    inp: torch.Tensor,
    groups: list[tuple[LoraAdapter, torch.Tensor]],
    layer: int,
    modules: tuple[str, ...],
    sizes: tuple[int, ...],
) -> None:
    """out[rows, slice] += scale * (inp[rows] @ A^T) @ B^T for each adapter group, in place."""
    for adapter, rows in groups:
        x = inp.index_select(0, rows)
        offset = 0
        for name, size in zip(modules, sizes, strict=True):
            weights = adapter.get(layer, name)
            if weights is not None:
                a, b = weights
                delta = F.linear(F.linear(x, a), b)
                out[rows, offset : offset + size] += delta
            offset += size
