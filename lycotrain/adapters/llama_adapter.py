"""Llama-Adapter (v1, PEFT's "adaption prompt"): L learnable prompt vectors per adapted decoder layer,
attended by the layer's queries in a separate softmax and added to the attention output through a
zero-initialised gate, so the model is unchanged at step 0 (specs/peft-methods.md §3).

    out = attention(x) + [o_proj]( gate * softmax(RoPE(q) k_P^T / sqrt(hd)) v_P )
    k_P, v_P = k_proj(P), v_proj(P)   (GPT-2: the k, v thirds of c_attn(P)); no RoPE on the prompt keys

Names follow PEFT (``adaption_prompt`` (1, L, hidden), ``adaption_gate`` (1,)) so saved folders load there.
Unlike PEFT, the queries are not recomputed: a forward hook on the query projection captures the ones the
attention module computed anyway (PEFT recomputes q and v), head counts come from the projection shapes (so
grouped-query attention and head_dim * heads != hidden both work), and Qwen2 is supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lycotrain.errors import AdapterError


@dataclass(frozen=True)
class AttentionLayout:
    """Where an architecture's attention keeps its projections, and what the prompt path applies."""

    module_name: str  # attribute of the decoder layer holding the attention ("self_attn", "attn")
    fused_qkv: bool  # GPT-2: one c_attn gives q, k, v
    rotary: bool  # queries get RoPE from the ``position_embeddings`` keyword
    project_output: bool  # apply o_proj to the prompt path (llama family); GPT-2 adds after c_proj


LAYOUTS: dict[str, AttentionLayout] = {
    "llama": AttentionLayout("self_attn", fused_qkv=False, rotary=True, project_output=True),
    "mistral": AttentionLayout("self_attn", fused_qkv=False, rotary=True, project_output=True),
    "qwen2": AttentionLayout("self_attn", fused_qkv=False, rotary=True, project_output=True),
    "gpt2": AttentionLayout("attn", fused_qkv=True, rotary=False, project_output=False),
}
PEFT_MODEL_TYPES = ("llama", "mistral", "gpt2")  # the ones PEFT 0.21 can load


def layout_for(model_type: str) -> AttentionLayout:
    if model_type not in LAYOUTS:
        raise AdapterError(f"llama_adapter: model type {model_type!r} is not supported; supported: "
                           f"{', '.join(LAYOUTS)}")
    return LAYOUTS[model_type]


# ---- pure functions ---------------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on queries (bs, H, T, hd) with cos/sin (bs, T, hd), as transformers' Llama applies it."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin


def adaption_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """gate * softmax(q k^T / sqrt(hd)) v with the softmax in fp32 over the L prompt slots (no mask).

    q: (bs, H, T, hd); k, v: (1, H_kv, L, hd) shared by the batch; query head h reads key head
    h // (H / H_kv) (grouped-query attention, like ``repeat_interleave``). Returns (bs, H, T, hd).
    """
    bs, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    if heads % kv_heads:
        raise AdapterError(f"llama_adapter: {heads} query heads cannot share {kv_heads} key/value heads")
    grouped = q.reshape(bs, kv_heads, (heads // kv_heads) * length, head_dim)
    scores = grouped @ k.transpose(-1, -2).to(q.dtype) / math.sqrt(head_dim)
    probs = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v.to(q.dtype)).view(bs, heads, length, head_dim)


# ---- module -----------------------------------------------------------------------------------------
class AdaptedAttention(nn.Module):
    """Wraps one attention module (kept as ``self.attn``, frozen) and adds the gated prompt path."""

    method = "llama_adapter"

    def __init__(self, attn: nn.Module, layout: AttentionLayout, adapter_len: int, hidden_size: int) -> None:
        super().__init__()
        if adapter_len < 1:
            raise AdapterError(f"llama_adapter: adapter_len must be >= 1, got {adapter_len}")
        if isinstance(attn, AdaptedAttention):
            raise AdapterError("llama_adapter: this attention module already has an adaption prompt")
        self.attn = attn
        self.layout = layout
        self.adapter_len = int(adapter_len)
        query_source = attn.c_attn if layout.fused_qkv else attn.q_proj
        weight = query_source.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        # N(0, 1) like the official nn.Embedding init; the gate starts at 0 so the output is unchanged.
        self.adaption_prompt = nn.Parameter(torch.empty(1, adapter_len, hidden_size, dtype=dtype,
                                                        device=weight.device).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, dtype=dtype, device=weight.device))
        self._captured: torch.Tensor | None = None
        self._hook = query_source.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._captured = output

    def remove(self) -> nn.Module:
        """Detach the hook and return the original attention module."""
        self._hook.remove()
        return self.attn

    @property
    def head_dim(self) -> int:
        return int(self.attn.head_dim)

    def _queries(self, projected: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        if self.layout.fused_qkv:
            projected = projected.split(self.attn.split_size, dim=2)[0]
        bs, length, _ = projected.shape
        q = projected.view(bs, length, -1, self.head_dim).transpose(1, 2)
        if self.layout.rotary:
            cos, sin = kwargs["position_embeddings"]
            q = apply_rotary(q, cos, sin)
        return q

    def _prompt_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self.adaption_prompt
        if self.layout.fused_qkv:
            _, key, value = self.attn.c_attn(prompt).split(self.attn.split_size, dim=2)
        else:
            key, value = self.attn.k_proj(prompt), self.attn.v_proj(prompt)
        shape = (1, self.adapter_len, -1, self.head_dim)
        return key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("output_attentions"):
            raise AdapterError("llama_adapter: output_attentions is not supported")
        outputs = self.attn(*args, **kwargs)
        projected, self._captured = self._captured, None
        hidden = outputs[0]
        q = self._queries(projected, kwargs)
        key, value = self._prompt_keys_values()
        adapter = adaption_attention(q, key, value, self.adaption_gate)
        bs, _, length, _ = adapter.shape
        adapter = adapter.transpose(1, 2).reshape(bs, length, -1)
        if self.layout.project_output:
            adapter = self.attn.o_proj(adapter)
        return (hidden + adapter.to(hidden.dtype), *outputs[1:])

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {"adaption_prompt": self.adaption_prompt.detach(), "adaption_gate": self.adaption_gate.detach()}

    def extra_repr(self) -> str:
        return f"method=llama_adapter, adapter_len={self.adapter_len}"
