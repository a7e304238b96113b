"""Per-layer KV cache with per-sequence lengths, and its memory accounting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor


@dataclass
class LayerCache:
    """One layer's keys and values; sequence b holds rows [0, lengths[b]).

    Storage is token-major [B, capacity, Hkv, D], so varlen attention kernels read it in place;
    `k` and `v` are its [B, Hkv, capacity, D] views, which the ops take. Device state (lengths,
    recent queries, rows) is only ever updated in place, so a captured CUDA graph of a decode
    step stays valid across steps and compactions.
    """

    k_store: Tensor
    v_store: Tensor
    lengths: Tensor            # [B] int64, on the device, owned by this layer
    bound: int                 # host upper bound of every length
    exact: bool = False        # every length equals bound (attention needs no mask)
    recent_q: Optional[Tensor] = None  # [B, Hq, W, D]: the layer's last W queries (decode scoring)
    unprocessed: int = 0       # tokens appended since the last decode chunk (same for every sequence)
    positions: Optional[Tensor] = None  # [B, Hkv, capacity, 1] original positions (tracking only)
    accumulated: Optional[Tensor] = None  # [B, Hkv, capacity, 1] float32 attention sums (H2O)

    @property
    def k(self) -> Tensor:
        return self.k_store.transpose(1, 2)

    @property
    def v(self) -> Tensor:
        return self.v_store.transpose(1, 2)

    @property
    def capacity(self) -> int:
        return self.k_store.shape[1]

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's K and V (all KV heads)."""
        _, _, H, D = self.k_store.shape
        return 2 * H * D * self.k_store.element_size()

    def keys(self, width: Optional[int] = None) -> Tensor:
        return self.k[:, :, : self.bound if width is None else width]

    def values(self, width: Optional[int] = None) -> Tensor:
        return self.v[:, :, : self.bound if width is None else width]

    def rows(self) -> List[Tensor]:
        """Every per-row buffer over [:bound] (K, V, positions, H2O sums): what compaction moves."""
        out = [self.keys(), self.values()]
        for extra in (self.positions, self.accumulated):
            if extra is not None:
                out.append(extra[:, :, : self.bound])
        return out

    def advance(self) -> None:
        """Host bookkeeping of one append (runs outside any captured graph)."""
        if self.bound >= self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded; allocate more decode room")
        self.bound += 1
        self.unprocessed += 1

    def write(self, k_new: Tensor, v_new: Tensor, q_new: Optional[Tensor] = None,
              position: Optional[Tensor] = None) -> None:
        """Device side of one append: the token [B, Hkv, 1, D] goes to each sequence's end."""
        B, H, _, D = k_new.shape
        at = self.lengths.view(B, 1, 1, 1)
        self.k_store.scatter_(1, at.expand(B, 1, H, D), k_new.transpose(1, 2))
        self.v_store.scatter_(1, at.expand(B, 1, H, D), v_new.transpose(1, 2))
        if self.positions is not None and position is not None:
            self.positions.scatter_(2, at.expand(B, H, 1, 1),
                                    position.view(B, 1, 1, 1).expand(B, H, 1, 1).to(self.positions.dtype))
        self.lengths.add_(1)
        if q_new is not None and self.recent_q is not None and self.recent_q.shape[2]:
            self.recent_q.copy_(torch.cat([self.recent_q[:, :, 1:], q_new], dim=2))

    def shrink(self, lengths: Tensor, bound: int) -> None:
        self.lengths.copy_(lengths)
        self.bound = min(self.bound, bound)
        self.exact = False


@dataclass
class CacheStats:
    """Memory of a compressed cache against a full one (bytes of K and V)."""

    layer_tokens: List[float]        # mean tokens held per sequence, per layer
    layer_bytes: List[int]           # bytes occupied by the held tokens, per layer
    layer_allocated: List[int]       # bytes of the buffers, per layer
    full_bytes_per_layer: int        # bytes a full cache of the same tokens holds in one layer
    prefill_tokens: List[int] = field(default_factory=list)  # tokens each layer computed in prefill
    workspace_bytes: int = 0         # merged layers' shared restore buffer (allocated, not held)

    @property
    def occupied_bytes(self) -> int:
        return sum(self.layer_bytes)

    @property
    def allocated_bytes(self) -> int:
        return sum(self.layer_allocated) + self.workspace_bytes

    @property
    def full_bytes(self) -> int:
        return self.full_bytes_per_layer * len(self.layer_bytes)

    @property
    def fraction(self) -> float:
        """Occupied bytes over a full cache's."""
        return self.occupied_bytes / max(self.full_bytes, 1)

    @property
    def allocated_fraction(self) -> float:
        return self.allocated_bytes / max(self.full_bytes, 1)

    def as_dict(self) -> Dict:
        return {"layer_tokens": self.layer_tokens, "layer_bytes": self.layer_bytes,
                "layer_allocated": self.layer_allocated, "occupied_bytes": self.occupied_bytes,
                "allocated_bytes": self.allocated_bytes, "full_bytes": self.full_bytes,
                "fraction": self.fraction, "allocated_fraction": self.allocated_fraction,
                "prefill_tokens": self.prefill_tokens, "workspace_bytes": self.workspace_bytes}

    def summary(self) -> str:
        lines = ["layer  tokens/seq  (pyramid)"]
        top = max(self.layer_tokens) if self.layer_tokens else 1
        for i, t in enumerate(self.layer_tokens):
            lines.append(f"{i:5d}  {t:10.1f}  {'#' * max(1, round(40 * t / top)) if t else ''}")
        lines.append(f"KV cache: {human_bytes(self.occupied_bytes)} held ({100 * self.fraction:.1f}% of "
                     f"a full cache's {human_bytes(self.full_bytes)}; saved "
                     f"{human_bytes(self.full_bytes - self.occupied_bytes)}), "
                     f"{human_bytes(self.allocated_bytes)} allocated"
                     + (f" (merge workspace {human_bytes(self.workspace_bytes)})" if self.workspace_bytes else ""))
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cache_stats(layers: List[LayerCache], full_tokens: Tensor, prefill_tokens: List[int],
                sources: Optional[Sequence[int]] = None) -> CacheStats:
    """Accounting of `layers` (one host synchronisation). full_tokens [B]: prompt + generated.

    sources: the sharing plan (layer i reads layer sources[i]'s cache, layers[i] aliasing it);
    readers report their slot's tokens but hold 0 bytes, so the bytes count each slot once."""
    lengths = torch.stack([c.lengths for c in layers]).cpu()  # [L, B]
    B = lengths.shape[1]
    owns = [sources is None or sources[i] == i for i in range(len(layers))]
    per_row = layers[0].row_bytes
    return CacheStats(
        layer_tokens=(lengths.double().sum(1) / max(B, 1)).tolist(),
        layer_bytes=[int(n) * per_row if o else 0 for n, o in zip(lengths.sum(1).tolist(), owns)],
        layer_allocated=[c.k.numel() * c.k.element_size() * 2 if o else 0 for c, o in zip(layers, owns)],
        full_bytes_per_layer=int(full_tokens.sum()) * per_row,
        prefill_tokens=list(prefill_tokens))
