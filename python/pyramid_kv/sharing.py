"""Cross-layer KV sharing: which layer's K/V each layer's queries read, and KVSharer calibration.

A plan maps every layer i to a source layer ``sources[i]``. Layers with ``sources[i] == i`` own a
cache slot; the others (readers) compute queries only, store nothing, and attend to their
source's slot. Plans are written as LCKV-style strings, one integer per layer: "0_0_2_2" lets
layer 1 read layer 0's K/V and layer 3 read layer 2's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SharingPlan:
    """sources[i]: the layer whose K/V slot layer i reads (i itself for a slot owner)."""

    sources: Tuple[int, ...]

    # ------------------------------------------------------------------ construction
    @classmethod
    def identity(cls, num_layers: int) -> "SharingPlan":
        return cls(tuple(range(num_layers)))

    @classmethod
    def parse(cls, text: str) -> "SharingPlan":
        """A plan from an LCKV layer-type string such as "0_0_2_2" (validated, see validate())."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a sharing plan is a string like '0_0_2_2', got {text!r}")
        sources = []
        for i, part in enumerate(text.strip().split("_")):
            if part.endswith("s"):
                raise ValueError(f"sharing plan {text!r}: layer {i} is marked 's' (sliding-window "
                                 "attention), which pyramid_kv does not implement")
            try:
                sources.append(int(part))
            except ValueError:
                raise ValueError(f"sharing plan {text!r}: layer {i}'s entry {part!r} is not an integer") from None
        return cls(tuple(sources)).validate(pretrained=False)  # the runner checks pretrained use

    def to_string(self) -> str:
        return "_".join(str(s) for s in self.sources)

    # ------------------------------------------------------------------ structure
    @property
    def num_layers(self) -> int:
        return len(self.sources)

    @property
    def slots(self) -> Tuple[int, ...]:
        """Layers that own K/V."""
        return tuple(i for i, s in enumerate(self.sources) if s == i)

    @property
    def readers(self) -> Tuple[int, ...]:
        """Layers that read another layer's K/V and store nothing."""
        return tuple(i for i, s in enumerate(self.sources) if s != i)

    @property
    def is_identity(self) -> bool:
        return not self.readers

    def validate(self, num_layers: Optional[int] = None, pretrained: bool = True) -> "SharingPlan":
        """Errors for a plan the runner cannot run.

        pretrained: the model was not trained with sharing, so a layer may read only its own or a
        LOWER layer's K/V (reading an upper layer needs a model trained for it and an iterated
        prefill)."""
        src = self.sources
        if num_layers is not None and len(src) != num_layers:
            raise ValueError(f"sharing plan {self.to_string()!r} has {len(src)} entries but the model "
                             f"has {num_layers} layers")
        for i, s in enumerate(src):
            if not (isinstance(s, int) and 0 <= s < len(src)):
                raise ValueError(f"sharing plan {self.to_string()!r}: layer {i} reads layer {s}, "
                                 f"outside 0..{len(src) - 1}")
        for i in range(len(src)):  # follow the chain from i: a revisit without a fixed point is a cycle
            seen, j = [i], src[i]
            while src[j] != j:
                if j in seen:
                    raise ValueError(f"sharing plan {self.to_string()!r}: layers "
                                     f"{' -> '.join(map(str, seen + [j]))} form a cycle")
                seen.append(j)
                j = src[j]
        for i, s in enumerate(src):
            if src[s] != s:  # chains must name the owning slot
                raise ValueError(f"sharing plan {self.to_string()!r}: layer {i} reads layer {s}, which "
                                 f"is itself a reader (of layer {src[s]}); name the owning slot instead")
        if pretrained:
            upper = [(i, s) for i, s in enumerate(src) if s > i]
            if upper:
                i, s = upper[0]
                raise ValueError(f"sharing plan {self.to_string()!r}: layer {i} reads upper layer {s}; "
                                 "a pretrained model can only read its own or a lower layer's K/V")
        return self


# ---------------------------------------------------------------------- KVSharer calibration
def _final_hidden(runner, ids: Tensor, lengths: Tensor) -> Tensor:
    runner.prefill(ids, lengths)
    return runner.hidden


def _cosine(h: Tensor, ref: Tensor, lengths: Tensor) -> float:
    """Mean over valid tokens of the cosine similarity of final hidden states [B, n, C]."""
    valid = torch.arange(h.shape[1], device=h.device)[None] < lengths.to(h.device)[:, None]
    cos = torch.nn.functional.cosine_similarity(h.float(), ref.float(), dim=-1)
    return float(cos[valid].mean())


@torch.no_grad()
def calibrate_kvsharer(model: nn.Module, input_ids=None, lengths: Optional[Tensor] = None, *,
                       texts: Optional[Sequence[str]] = None, tokenizer=None,
                       max_readers: Optional[int] = None, target_fraction: Optional[float] = None,
                       threshold: float = 0.9) -> SharingPlan:
    """KVSharer (arXiv 2410.18517): a sharing plan for a pretrained model, found on a few sentences.

    Parameters
    ----------
    model : a model pyramid_kv.Runner drives
    input_ids : calibration ids [B, n] (left-aligned, ``lengths`` [B] valid tokens; default all) or
        token-id lists; or ``texts`` with a ``tokenizer``
    max_readers, target_fraction : stop once this many layers read another's K/V, or once the
        slots hold at most this fraction of the layers' K/V (default: as many as pass the threshold)
    threshold : accept a pair only if the final hidden states' cosine similarity to the full
        model's (mean over valid tokens) stays >= threshold

    Pairs (lower, upper) are ranked by the Euclidean distance of the layers' K and V averaged
    over valid tokens, MOST dissimilar first (KVSharer's counter-intuitive finding); the upper
    layer then reads the lower layer's slot if the lower layer owns one, the upper one is not yet
    a reader, and no layer reads the upper one.
    """
    from .config import PRESETS
    from .generate import batch_prompts
    from .runner import Runner

    if texts is not None:
        input_ids, lengths = batch_prompts(list(texts), tokenizer)
    elif not isinstance(input_ids, Tensor):
        input_ids, lengths = batch_prompts(input_ids)
    elif lengths is None:
        lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long)
    full = Runner(model, PRESETS["full"])
    L = full.adapter.shape.num_layers
    if max_readers is None:
        max_readers = L - 1 if target_fraction is None else L - math.floor(target_fraction * L + 1e-9)
    ref = _final_hidden(full, input_ids, lengths)

    # Each layer's K and V averaged over the valid tokens of every sequence.
    means = []
    for c in full.layers:
        valid = (torch.arange(c.bound, device=c.lengths.device)[None] < c.lengths[:, None]).float()
        w = valid[:, None, :, None] / valid.sum()
        means.append(torch.cat([(c.keys() * w).sum((0, 2)).flatten(), (c.values() * w).sum((0, 2)).flatten()]).float())
    pairs = sorted(((float((means[lo] - means[up]).norm()), lo, up) for lo in range(L) for up in range(lo + 1, L)),
                   reverse=True)

    sources = list(range(L))
    readers = 0
    for _, lo, up in pairs:
        if readers >= max_readers:
            break
        if sources[lo] != lo or sources[up] != up or any(s == up for i, s in enumerate(sources) if i != up):
            continue
        trial = sources.copy()
        trial[up] = lo
        cfg = PRESETS["full"].replace(sharing=SharingPlan(tuple(trial)).to_string())
        if _cosine(_final_hidden(Runner(model, cfg), input_ids, lengths), ref, lengths) >= threshold:
            sources, readers = trial, readers + 1
    return SharingPlan(tuple(sources)).validate(L)


__all__: List[str] = ["SharingPlan", "calibrate_kvsharer"]
