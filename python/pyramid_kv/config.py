"""PyramidInfer configuration: validated, JSON-serialisable, with presets.

A compressing layer keeps a fraction ``r_l`` of its context (the tokens before the recent window)
for the next layer; the fractions multiply down the layers (the pyramid). In "count" mode ``r_l``
is a top-k ratio of the context length, in "mass" mode it is the top-p mass to keep.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from .sharing import SharingPlan

SCHEDULES = ("cosine", "power", "linear", "constant", "list")
SELECTIONS = ("count", "mass")
WEIGHTINGS = ("uniform", "linear")
POLICIES = ("pyramid", "h2o", "streaming", "snapkv")
MERGE_DEFAULTS: Dict[str, Any] = {"start": None, "t": 0.5, "retain": 0.05, "attention": "direct"}
MERGE_ATTENTION = ("direct", "restore")


def _ratio(name: str, value: float, *, zero_ok: bool = False) -> None:
    lo_ok = value >= 0 if zero_ok else value > 0
    if not (isinstance(value, (int, float)) and lo_ok and value <= 1):
        raise ValueError(f"{name} must be in {'[0' if zero_ok else '(0'}, 1], got {value!r}")


def _count(name: str, value: int, minimum: int = 0) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def decay_schedule(kind: str, num_layers: int, floor: float, power: float = 1.0) -> List[float]:
    """Per-layer factors falling from 1 at layer 0 towards ``floor`` at the last layer."""
    out = []
    for layer in range(num_layers):
        x = layer / num_layers
        if kind == "cosine":  # the reference code's schedule
            f = (1 - floor) * (math.cos(math.pi * x) + 1) / 2 + floor
        elif kind == "linear":
            f = 1 - (1 - floor) * x
        elif kind == "power":  # flat in shallow layers, steeper in deep ones for power > 1
            f = floor + (1 - floor) * (1 - x ** power)
        elif kind == "constant":
            f = floor
        else:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        out.append(f)
    return out


@dataclass
class PyramidConfig:
    """Everything that controls compression. Call :meth:`validate` (done by the runner)."""

    enabled: bool = True
    # ---- prefill: which tokens each layer passes on
    recent_ratio: float = 0.2           # recent window = ceil(ratio * length) of each sequence
    recent_weighting: str = "linear"    # weights of the recent rows: "uniform" or "linear"
    recent_weight_max: float = 1.2      # "linear": oldest row 1.0, newest this
    selection: str = "count"            # "count" (top-k ratio) or "mass" (top-p)
    schedule: str = "cosine"            # cosine | power | linear | constant | list
    decay: float = 0.9                  # keep ratio / mass reached at the deepest layer
    power: float = 2.0                  # exponent of the "power" schedule
    layer_ratios: Optional[List[float]] = None  # schedule="list": one value per layer
    first_layer: int = 0                # first compressing layer ...
    interval: int = 1                   # ... and then every `interval` layers
    sinks: int = 4                      # first tokens always kept
    min_context: int = 64               # never keep fewer context tokens than this
    # ---- decode
    decode: bool = True
    decode_chunk: int = 16              # re-compress every `chunk` new tokens of a layer ...
    decode_recent: int = 16             # ... once they are older than this recent window
    decode_keep: float = 0.9            # fraction of a chunk layer 0 keeps ...
    decode_decay: float = 0.1           # ... times a cosine factor falling to this at depth
    decode_layer_ratios: Optional[List[float]] = None  # explicit per-layer chunk keep ratios
    per_head: bool = True               # cache eviction (decode chunks, budgets) per KV head
    # ---- serving: a hard per-layer cache size (tokens per sequence), or None, and how to
    # evict down to it: "pyramid" (the recent queries' ensemble), "h2o" (accumulated attention,
    # half the budget for the recent window), "streaming" (sinks + most recent), "snapkv"
    # (pooled scores of the last decode_recent prompt queries; prompt only, decode keeps all)
    kv_budget: Optional[Union[int, List[int]]] = None
    budget_policy: str = "pyramid"
    # ---- cross-layer KV sharing: an LCKV-style plan ("0_0_2_2": layer 1 reads layer 0's K/V,
    # layer 3 layer 2's; see pyramid_kv.sharing), or None for every layer owning its K/V
    sharing: Optional[str] = None
    # ---- MiniCache cross-layer merging (pyramid_kv.merging): None, or a dict with any of
    # "start" (first merged layer, default half depth), "t" (SLERP weight, 0.5), "retain"
    # (fraction of each (sequence, KV head)'s tokens kept unmerged, the most divergent, 0.05) and
    # "attention" ("direct": ops.merged_attention over the merged slot, the default; "restore":
    # restore into a workspace, then flash decode attention). Layers (start, start+1),
    # (start+2, start+3), ... are merged pairs.
    merge: Optional[Dict[str, Any]] = None
    name: str = "custom"

    # ------------------------------------------------------------------ validation
    def validate(self) -> "PyramidConfig":
        _ratio("recent_ratio", self.recent_ratio)
        if self.recent_weighting not in WEIGHTINGS:
            raise ValueError(f"recent_weighting must be one of {WEIGHTINGS}, got {self.recent_weighting!r}")
        if not (isinstance(self.recent_weight_max, (int, float)) and self.recent_weight_max > 0):
            raise ValueError(f"recent_weight_max must be > 0, got {self.recent_weight_max!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _ratio("decay", self.decay)
        if not (isinstance(self.power, (int, float)) and self.power > 0):
            raise ValueError(f"power must be > 0, got {self.power!r}")
        if self.schedule == "list":
            if not self.layer_ratios:
                raise ValueError("schedule='list' needs layer_ratios (one value per layer)")
        for i, r in enumerate(self.layer_ratios or []):
            _ratio(f"layer_ratios[{i}]", r)
        _count("first_layer", self.first_layer)
        _count("interval", self.interval, 1)
        _count("sinks", self.sinks)
        _count("min_context", self.min_context)
        _count("decode_chunk", self.decode_chunk, 1)
        _count("decode_recent", self.decode_recent, 1)
        _ratio("decode_keep", self.decode_keep, zero_ok=True)
        _ratio("decode_decay", self.decode_decay, zero_ok=True)
        for i, r in enumerate(self.decode_layer_ratios or []):
            _ratio(f"decode_layer_ratios[{i}]", r, zero_ok=True)
        if self.budget_policy not in POLICIES:
            raise ValueError(f"budget_policy must be one of {POLICIES}, got {self.budget_policy!r}")
        budgets = self.kv_budget if isinstance(self.kv_budget, list) else [self.kv_budget]
        for i, b in enumerate(budgets):
            if b is not None:
                _count(f"kv_budget[{i}]" if isinstance(self.kv_budget, list) else "kv_budget", b, 1)
        if self.sharing is not None:
            SharingPlan.parse(self.sharing)
        if self.merge is not None:
            self._validate_merge()
        return self

    def _validate_merge(self) -> None:
        m = self.merge
        if not isinstance(m, dict):
            raise ValueError(f"merge must be None or a dict with keys {sorted(MERGE_DEFAULTS)}, got {m!r}")
        unknown = set(m) - set(MERGE_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown merge keys {sorted(unknown)}; known: {sorted(MERGE_DEFAULTS)}")
        if m.get("start") is not None:
            _count("merge['start']", m["start"])
        _ratio("merge['t']", m.get("t", MERGE_DEFAULTS["t"]), zero_ok=True)
        _ratio("merge['retain']", m.get("retain", MERGE_DEFAULTS["retain"]), zero_ok=True)
        attention = m.get("attention", MERGE_DEFAULTS["attention"])
        if attention not in MERGE_ATTENTION:
            raise ValueError(f"merge['attention'] must be one of {MERGE_ATTENTION}, got {attention!r}")
        if self.kv_budget is not None:
            raise ValueError("merge cannot be combined with kv_budget (merged pairs are not evicted)")

    def merge_option(self, key: str):
        """A merge setting (its default when absent); only meaningful with merge set."""
        value = (self.merge or {}).get(key)
        return MERGE_DEFAULTS[key] if value is None else value

    def merged_pairs(self, num_layers: int) -> List[tuple]:
        """The merged layer pairs (l, l + 1) of a num_layers model (none without merge)."""
        if self.merge is None:
            return []
        start = self.merge_option("start")
        start = num_layers // 2 if start is None else start
        return [(l, l + 1) for l in range(start, num_layers - 1, 2)]

    # ------------------------------------------------------------------ per-layer plan
    def check_layers(self, num_layers: int) -> None:
        """Errors for per-layer lists whose length does not match the model."""
        for name in ("layer_ratios", "decode_layer_ratios", "kv_budget"):
            v = getattr(self, name)
            if isinstance(v, list) and len(v) != num_layers:
                raise ValueError(f"{name} has {len(v)} entries but the model has {num_layers} layers")
        if self.first_layer >= num_layers and self.enabled:
            raise ValueError(f"first_layer ({self.first_layer}) must be < the model's {num_layers} layers")
        plan = self.sharing_plan(num_layers)
        if self.merge is not None:
            pairs = self.merged_pairs(num_layers)
            if not pairs:
                raise ValueError(f"merge['start'] ({self.merge_option('start')}) leaves no pair of "
                                 f"adjacent layers in the model's {num_layers} layers")
            shared = set(plan.readers) | {plan.sources[r] for r in plan.readers}
            for pair in pairs:
                if shared & set(pair):
                    raise ValueError(f"merged pair {pair} takes part in the sharing plan "
                                     f"{plan.to_string()!r}: merged layers must own unshared slots")

    def sharing_plan(self, num_layers: int) -> SharingPlan:
        """The validated sharing plan for a pretrained model of num_layers (identity without one)."""
        if self.sharing is None:
            return SharingPlan.identity(num_layers)
        return SharingPlan.parse(self.sharing).validate(num_layers, pretrained=True)

    def compresses(self, layer: int, num_layers: int) -> bool:
        """Whether prefill selects tokens after `layer` (never after the last layer, nor between
        the two layers of a merged pair: both must hold the same tokens)."""
        return (self.enabled and layer < num_layers - 1 and layer >= self.first_layer
                and (layer - self.first_layer) % self.interval == 0
                and all(layer != a for a, _ in self.merged_pairs(num_layers)))  # pairs hold the same tokens

    def layer_keep(self, num_layers: int) -> List[float]:
        """Keep ratio (count) or mass (mass) of the context at each layer."""
        self.check_layers(num_layers)
        if self.schedule == "list":
            return list(self.layer_ratios)
        return decay_schedule(self.schedule, num_layers, self.decay, self.power)

    def decode_keep_ratios(self, num_layers: int) -> List[float]:
        """Fraction of each decode chunk that each layer keeps."""
        self.check_layers(num_layers)
        if self.decode_layer_ratios is not None:
            return list(self.decode_layer_ratios)
        return [self.decode_keep * f for f in decode_cosine(num_layers, self.decode_decay)]

    def budgets(self, num_layers: int) -> List[Optional[int]]:
        self.check_layers(num_layers)
        if isinstance(self.kv_budget, list):
            return list(self.kv_budget)
        return [self.kv_budget] * num_layers

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PyramidConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PyramidConfig fields: {sorted(unknown)}")
        return cls(**d).validate()

    @classmethod
    def from_json(cls, text: str) -> "PyramidConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "PyramidConfig":
        return dataclasses.replace(self, **changes).validate()


def decode_cosine(num_layers: int, floor: float) -> List[float]:
    return decay_schedule("cosine", num_layers, floor)


PRESETS: Dict[str, PyramidConfig] = {
    # Compression off: the runner then equals a full-cache generate().
    "full": PyramidConfig(enabled=False, decode=False, name="full"),
    # The paper's LLaMA-2-7B setting as shipped in its reference code: a top-k cosine schedule
    # falling to 0.9 per layer, every layer, 20% recent window, 4 sinks, a 64-token floor, and
    # decode chunks of 16 kept at 0.9 x a cosine factor falling to 0.1.
    "paper-7b": PyramidConfig(name="paper-7b"),
    # 13B: a stronger decay (0.8), compressing every second layer.
    "paper-13b": PyramidConfig(decay=0.8, interval=2, name="paper-13b"),
    # 44% of a full cache at 512 prompt + 256 generated tokens on a 40-layer model (LLaMA-2-13B
    # shape; 46% at 32 layers), as computed by pyramid_kv.plan: the paper's Table 1 budget.
    "kv45": PyramidConfig(decay=0.3, decode_keep=0.6, name="kv45"),
    # 34-36% at 512 + 256 on 32-40 layers: memory-bound serving that accepts some quality loss.
    "aggressive": PyramidConfig(recent_ratio=0.1, decay=0.1, decode_keep=0.3, min_context=32,
                                name="aggressive"),
}


def preset(name: str, **changes) -> PyramidConfig:
    """A copy of a named preset, optionally changed (``preset("kv45", selection="mass")``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **changes).validate()

