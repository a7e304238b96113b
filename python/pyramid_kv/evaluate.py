"""Quality of compressed caches: continuation perplexity, agreement and KL against a full cache.

For each evaluation window of n + m tokens, a method prefills the first n WITH compression,
then scores the next m tokens teacher-forced through decode steps on its compressed cache
(decode compression active). Methods are compared at matched KV budgets: the fraction of a full
cache they hold, averaged over the m steps. Every method runs on the same ops (ensemble scores,
segmented selection, compaction); they differ in their scores and windows.

Cross-layer sharing methods ("kvsharer", "pyramid+kvsharer") hold K/V in slots only; their
KVSharer plans are calibrated on sentences from the END of the data file, never on the
evaluation windows (which come from its start).

Merging methods ("minicache": MiniCache merging alone, sized by its first merged layer;
"pyramid+minicache": merging from half depth, the pyramid sized to the rest of the budget) are
calibrated by measurement, like "pyramid-mass". Every fraction is in BYTES (Runner.held_bytes:
directions once, norms, retained rows and indices, raw tails) over a full cache's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import plan
from .config import PRESETS, PyramidConfig, preset
from .generate import batch_prompts
from .runner import Runner
from .sharing import SharingPlan, calibrate_kvsharer

METHODS = ("full", "pyramid-count", "pyramid-mass", "pyramid-evict", "streaming", "h2o", "snapkv")
# Cache-eviction methods: every layer computes on all prompt tokens, its cache is trimmed to a
# budget. "pyramid-evict" is the ablation of PyramidInfer's token dropping: the same recent-query
# votes, used only to evict (budget_policy "pyramid").
EVICTION_POLICIES = {"pyramid-evict": "pyramid", "streaming": "streaming", "h2o": "h2o", "snapkv": "snapkv"}
# Cross-layer sharing: they need calibration sentences (evaluate_model's `calibration`).
SHARING_METHODS = ("kvsharer", "pyramid+kvsharer")
# "pyramid+kvsharer" fixes its sharing part at this fraction (KVSharer's reported ~25-30% saving)
# and sizes the pyramid part to the rest of the budget.
SHARE_FRACTION = 0.75
# MiniCache merging: retained (unmerged) fraction of each (sequence, KV head)'s prompt tokens.
MERGE_METHODS = ("minicache", "pyramid+minicache")
MERGE_RETAIN = 0.05
BUDGETS = (1.0, 0.75, 0.6, 0.45, 0.3)
# The text each model in ../shared/models is evaluated on (its README); others use WikiText-2.
DATA = {"stories260K": "tinystories/tinystories_val_head.txt",
        "babyllama105": "tinystories/tinystories_val_head.txt",
        "codelm20m": "code/stdlib311_heldout.txt"}
WIKITEXT = "wikitext2/wiki.test.raw"


@dataclass(frozen=True)
class EvalSettings:
    prompt_len: int
    new_tokens: int
    windows: int = 8
    batch_size: int = 8
    budgets: Sequence[float] = BUDGETS
    methods: Sequence[str] = METHODS
    share_threshold: float = 0.9        # KVSharer: least cosine of the final hidden states


def default_settings(context: int, **changes) -> EvalSettings:
    """Prompts of 3/4 of the model's context, continuations of up to 1/8 of it (<= 128)."""
    n = (3 * context) // 4
    m = max(8, min(128, context // 8, context - n - 1))
    return dataclasses.replace(EvalSettings(n, m), **changes)


# ---------------------------------------------------------------------- data
def _documents(path: Path) -> List[str]:
    text = Path(path).read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    return [d.strip() for d in text.split("<|endoftext|>") if d.strip()]


def calibration_from_text(tokenizer, path: Path, count: int, max_len: int,
                          after_tokens: int) -> Tuple[Tensor, Tensor]:
    """`count` calibration sequences (ids [count, <= max_len], lengths) from the LAST documents of
    a file, checked to lie after the first `after_tokens` tokens (the evaluation windows)."""
    docs = _documents(path)
    rows = [tokenizer(d).input_ids[:max_len] for d in docs[::-1][:count]]
    before = 0
    for d in docs[: len(docs) - count]:
        before += len(tokenizer(d).input_ids)
        if before >= after_tokens:
            return batch_prompts(rows)
    raise ValueError(f"{path} is too short to keep {count} calibration documents apart from "
                     f"{after_tokens} evaluation tokens")


def windows_from_text(tokenizer, path: Path, n: int, m: int, count: int) -> Tensor:
    """`count` consecutive windows of n + m tokens from a text file whose documents are joined
    by <|endoftext|> (each document tokenised on its own, with the tokenizer's BOS)."""
    docs = _documents(path)
    need = count * (n + m)
    stream: List[int] = []
    for d in docs:
        stream.extend(tokenizer(d).input_ids)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"{path} holds {len(stream)} tokens, fewer than {count} windows of {n + m}")
    return torch.tensor(stream[:need], dtype=torch.long).view(count, n + m)


# ---------------------------------------------------------------------- methods at a budget
def pyramid_family(s: float, selection: str, num_layers: int) -> PyramidConfig:
    """PyramidInfer with one knob s in (0, 1] for budget sweeps (1 keeps everything): a cosine
    schedule falling to s, shifted one layer so that layer 0 already passes on fewer tokens
    (the reference's schedule keeps all of them at layer 0, which alone puts shallow models
    above most budgets), and decode chunks kept at s times a cosine factor; a 10% recent window,
    4 sinks, a 16-token context floor."""
    s = min(max(s, 1e-3), 1.0)
    ratios = [(1 - s) * (math.cos(math.pi * (i + 1) / num_layers) + 1) / 2 + s for i in range(num_layers)]
    return PyramidConfig(recent_ratio=0.1, min_context=16, sinks=4, schedule="list",
                         layer_ratios=ratios, decode_keep=s, selection=selection,
                         name=f"pyramid-{selection}").validate()


def budget_config(method: str, budget: int) -> PyramidConfig:
    """A cache-eviction method (EVICTION_POLICIES) holding at most `budget` tokens per layer."""
    policy = EVICTION_POLICIES[method]
    window = 32 if policy == "snapkv" else 16  # SnapKV's observation window
    return PyramidConfig(enabled=False, decode=False, kv_budget=budget, budget_policy=policy,
                         decode_chunk=1, decode_recent=window, sinks=4, per_head=True,
                         name=method).validate()


def _bisect(fraction: Callable[[float], float], target: float, lo: float, hi: float,
            steps: int, integer: bool = False) -> float:
    """Largest x in [lo, hi] with fraction(x) <= target (fraction non-decreasing in x)."""
    if fraction(hi) <= target:
        return hi
    for _ in range(steps):
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if fraction(mid) <= target else (lo, mid)
    return lo


def method_config(method: str, target: float, num_layers: int, n: int, m: int,
                  measure: Optional[Callable[[PyramidConfig], float]] = None,
                  share: Optional[Callable[[float], SharingPlan]] = None) -> PyramidConfig:
    """The method's configuration holding about `target` of a full cache over the m steps.

    Count-based methods are sized exactly with pyramid_kv.plan; top-p ("pyramid-mass") keeps a
    data-dependent count, so it is calibrated with `measure` (a run on the first windows).
    Sharing methods take `share(fraction)`: a KVSharer plan calibrated to hold that fraction
    (or more, when its cosine threshold stops it earlier).
    """
    if method == "full" or target >= 1.0:
        return preset("full")
    if method in SHARING_METHODS:
        if share is None:
            raise ValueError(f"{method} needs share() (calibration sentences) to build its plan")
        if method == "kvsharer":
            return PRESETS["full"].replace(sharing=share(target).to_string(), name="kvsharer")
        # Fix the sharing part, then size the pyramid to the rest of the budget (planned exactly:
        # sharing changes no count, it only stops readers from holding any).
        sharing = share(max(target, SHARE_FRACTION)).to_string()
        s = _bisect(lambda s: plan.mean_fraction(pyramid_family(s, "count", num_layers).replace(sharing=sharing),
                                                 num_layers, n, m), target, 0.0, 1.0, 20)
        return pyramid_family(s, "count", num_layers).replace(sharing=sharing, name="pyramid+kvsharer")
    if method in MERGE_METHODS:
        if measure is None:
            raise ValueError(f"{method} needs a measure() to calibrate its budget")
        # t stays at MERGE_DEFAULTS["t"] (0.5)
        merge = lambda start=None: {"start": start, "retain": MERGE_RETAIN}  # noqa: E731
        if method == "minicache":  # fewest merged pairs (largest first merged layer) within target
            cfg = lambda st: PRESETS["full"].replace(merge=merge(int(st)), name="minicache")  # noqa: E731
            return cfg(_bisect(lambda st: measure(cfg(st)), target, 0, num_layers - 2, 20, integer=True))
        cfg = lambda s: pyramid_family(s, "count", num_layers).replace(merge=merge(), name=method)  # noqa: E731
        return cfg(_bisect(lambda s: measure(cfg(s)), target, 0.0, 1.0, 8))
    if method == "pyramid-count":
        s = _bisect(lambda s: plan.mean_fraction(pyramid_family(s, "count", num_layers), num_layers, n, m),
                    target, 0.0, 1.0, 20)
        return pyramid_family(s, "count", num_layers)
    if method == "pyramid-mass":
        if measure is None:
            raise ValueError("pyramid-mass needs a measure() to calibrate its budget")
        s = _bisect(lambda s: measure(pyramid_family(s, "mass", num_layers)), target, 0.0, 1.0, 8)
        return pyramid_family(s, "mass", num_layers)
    if method in EVICTION_POLICIES:
        least = budget_config(method, 10**6).decode_recent + 1 + 4 + 1
        b = _bisect(lambda b: plan.mean_fraction(budget_config(method, int(b)), num_layers, n, m),
                    target, least, n + m, 40, integer=True)
        return budget_config(method, int(b))
    raise ValueError(f"unknown method {method!r}; methods: {METHODS}")


# ---------------------------------------------------------------------- scoring
@dataclass
class Scores:
    nll: float = 0.0          # summed negative log-likelihood of the continuation tokens
    tokens: int = 0
    agree: float = 0.0        # summed top-1 agreement with the full cache
    kl: float = 0.0           # summed KL(full || compressed), nats
    held: float = 0.0         # summed (fraction held) over windows x steps
    steps: int = 0

    def add(self, other: "Scores") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> Dict[str, float]:
        return {"ppl": math.exp(self.nll / max(self.tokens, 1)), "agreement": self.agree / max(self.tokens, 1),
                "kl": self.kl / max(self.tokens, 1), "fraction": self.held / max(self.steps, 1),
                "tokens": self.tokens}


@torch.no_grad()
def score_windows(model, config: PyramidConfig, ids: Tensor, n: int,
                  full_logprobs: Optional[List[Tensor]] = None,
                  keep_logprobs: bool = False) -> tuple:
    """Teacher-forced continuation scores of windows ids [W, n + m] under `config`.

    Returns (Scores, per-step log-probs if keep_logprobs, per-layer tokens held at the end).
    """
    runner = Runner(model, config)
    W, total = ids.shape
    m = total - n
    dev = runner.adapter.device
    ids = ids.to(dev)
    L = runner.adapter.shape.num_layers
    logits = runner.prefill(ids[:, :n], torch.full((W,), n), m)
    out = Scores(tokens=W * m, steps=W * m)
    nll = torch.zeros((), device=dev, dtype=torch.float64)
    agree = torch.zeros((), device=dev, dtype=torch.float64)
    kl = torch.zeros((), device=dev, dtype=torch.float64)
    held = torch.zeros((), device=dev, dtype=torch.float64)
    kept = []
    for t in range(m):
        lp = logits.float().log_softmax(-1)
        target = ids[:, n + t]
        nll -= lp.gather(1, target[:, None]).sum()
        cached = runner.held_bytes()  # [W] over slots (sharing readers hold none) and merged pairs
        held += (cached.double() / (runner.layers[0].row_bytes * L * (n + t))).sum()
        if full_logprobs is not None:
            ref = full_logprobs[t].to(dev)
            agree += (ref.argmax(-1) == lp.argmax(-1)).sum()
            kl += (ref.exp() * (ref - lp)).sum()
        if keep_logprobs:
            kept.append(lp.cpu())
        if t + 1 < m:
            logits = runner.decode_step(target)
    out.nll, out.held = float(nll), float(held)
    out.agree, out.kl = float(agree), float(kl)
    return out, kept, runner.stats().layer_tokens


def evaluate_model(model, windows: Tensor, settings: EvalSettings, progress: bool = True,
                   label: str = "", calibration: Optional[Tuple[Tensor, Tensor]] = None) -> List[Dict]:
    """Every method at every budget on `windows` [count, n + m]; one result dict each.

    calibration: (ids, lengths) of KVSharer's calibration sentences, needed by SHARING_METHODS;
    keep them apart from the windows (see calibration_from_text)."""
    n, m = settings.prompt_len, settings.new_tokens
    L = model.config.num_hidden_layers
    batches = list(windows.split(settings.batch_size))
    # The full cache's log-probs, per batch: the reference for agreement and KL.
    full_scores, full_lp = Scores(), []
    for b in batches:
        s, lp, _ = score_windows(model, preset("full"), b, n, keep_logprobs=True)
        full_scores.add(s)
        full_lp.append(lp)
    full = full_scores.as_dict()

    measured: Dict[str, float] = {}

    def measure(cfg: PyramidConfig) -> float:
        key = cfg.to_json()
        if key not in measured:
            measured[key] = score_windows(model, cfg, batches[0], n)[0].as_dict()["fraction"]
        return measured[key]

    share = None
    if calibration is not None:
        @functools.lru_cache(maxsize=None)
        def share(fraction: float) -> SharingPlan:
            return calibrate_kvsharer(model, *calibration, target_fraction=fraction,
                                      threshold=settings.share_threshold)

    def smallest(method: str) -> float:
        """The least a method can hold here (its smallest setting): budgets below are unreachable."""
        cfg = method_config(method, 0.0, L, n, m, measure, share)
        measured_only = method == "pyramid-mass" or method in MERGE_METHODS
        return measure(cfg) if measured_only else plan.mean_fraction(cfg, L, n, m)

    runs = [(mth, x) for mth in settings.methods for x in settings.budgets]
    bar = _progress(runs, f"eval {label}".strip(), progress)
    results = []
    for method, target in bar:
        cfg = method_config(method, target, L, n, m, measure, share)
        total, layer_tokens = Scores(), None
        for b, lp in zip(batches, full_lp):
            s, _, layer_tokens = score_windows(model, cfg, b, n, full_logprobs=lp)
            total.add(s)
        row = {"model": label, "method": method, "target": target, **total.as_dict(),
               "min_fraction": smallest(method) if target < 1.0 else 1.0,
               "full_ppl": full["ppl"], "layer_tokens": layer_tokens, "config": cfg.to_dict()}
        row["ppl_ratio"] = row["ppl"] / full["ppl"]
        results.append(row)
    return results


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc)
