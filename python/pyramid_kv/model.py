"""Drive a Hugging Face Llama-family model's own modules layer by layer.

The runner never calls a decoder layer's forward (which would attend over every token through
transformers' cache); it calls the layer's norms, projections, rotary embedding, MLP and output
projection itself, so it decides which tokens each layer sees and what each layer caches.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: torch.dtype
    sliding_window: Optional[int]

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


class ModelAdapter:
    """Access to the parts of a LlamaForCausalLM-like model that the runner calls."""

    def __init__(self, model: nn.Module):
        cfg = getattr(model, "config", None)
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED:
            raise ValueError(f"unsupported architecture {model_type!r}: pyramid_kv drives "
                             f"{', '.join(SUPPORTED)} models (transformers 5.x)")
        base = getattr(model, "model", None)
        parts = ("embed_tokens", "layers", "norm", "rotary_emb")
        if base is None or any(not hasattr(base, p) for p in parts) or not hasattr(model, "lm_head"):
            raise ValueError(f"unsupported model class {type(model).__name__}: expected "
                             f"<Model>ForCausalLM with .model.{{{', '.join(parts)}}} and .lm_head")
        self.model = model
        self.embed = base.embed_tokens
        self.layers = base.layers
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        self.shape = ModelShape(
            num_layers=len(self.layers), num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads, head_dim=attn.head_dim,
            hidden_size=cfg.hidden_size, dtype=self.embed.weight.dtype,
            sliding_window=_active_sliding_window(cfg))
        # Each architecture's own RoPE application (Llama, Qwen and Mistral share the formula,
        # but we call the model's function rather than copy it).
        self._apply_rope: Callable = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def check_length(self, total_tokens: int) -> None:
        w = self.shape.sliding_window
        if w is not None and total_tokens > w:
            raise ValueError(f"this model uses sliding-window attention ({w} tokens), which pyramid_kv "
                             f"does not implement; keep prompt + new tokens <= {w} (got {total_tokens})")

    def rope(self, h: Tensor, positions: Tensor) -> Tuple[Tensor, Tensor]:
        """cos, sin [B, n, D] at the given (original) positions [B, n]."""
        return self.rotary(h, positions)

    def qkv(self, layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Queries [B, Hq, n, D], keys and values [B, Hkv, n, D] of normed hidden states x."""
        attn = layer.self_attn
        B, n, _ = x.shape
        D = self.shape.head_dim
        q = attn.q_proj(x).view(B, n, -1, D)
        k = attn.k_proj(x).view(B, n, -1, D)
        v = attn.v_proj(x).view(B, n, -1, D)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self._apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v.transpose(1, 2)

    def q_only(self, layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Queries [B, Hq, n, D] of normed hidden states x, for a layer that reads another
        layer's K/V (cross-layer sharing): its k_proj and v_proj are never run."""
        attn = layer.self_attn
        B, n, _ = x.shape
        q = attn.q_proj(x).view(B, n, -1, self.shape.head_dim)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        # The model's RoPE function rotates q and k together; an empty k costs nothing.
        return self._apply_rope(q, q[:, :0], cos, sin)[0]

    @staticmethod
    def scale(layer: nn.Module) -> float:
        return float(layer.self_attn.scaling)

    @staticmethod
    def attn_out(layer: nn.Module, o: Tensor) -> Tensor:
        """Output projection of attention output o [B, Hq, n, D] -> [B, n, C]."""
        B, H, n, D = o.shape
        return layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, n, H * D))

    @staticmethod
    def mlp_block(layer: nn.Module, h: Tensor) -> Tensor:
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, h_last: Tensor) -> Tensor:
        """Next-token logits (float32) of final hidden states [B, C]."""
        return self.lm_head(self.norm(h_last)).float()


def _active_sliding_window(cfg) -> Optional[int]:
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)
