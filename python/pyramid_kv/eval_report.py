"""Evaluation outputs: a markdown table, JSON, and PNG plots (quality vs KV, the pyramid)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

PYRAMID = ("pyramid-count", "pyramid-mass")
RIVALS = ("streaming", "h2o")


def verdicts(rows: List[Dict], model: str) -> List[str]:
    """The issue's claim at each budget <= 50%: PyramidInfer within +3% of the full cache's
    perplexity and below StreamingLLM's and H2O's."""
    out = []
    for target in sorted({r["target"] for r in rows if r["model"] == model and r["target"] <= 0.5}, reverse=True):
        at = {r["method"]: r for r in rows if r["model"] == model and r["target"] == target}
        for p in PYRAMID:
            if p not in at:
                continue
            r = at[p]
            rivals = {k: at[k]["ppl"] for k in RIVALS if k in at}
            within = r["ppl_ratio"] <= 1.03
            better = all(r["ppl"] < v for v in rivals.values())
            out.append(f"- {model} @ {target:.0%}: {p} holds {r['fraction']:.1%}, ppl {r['ppl']:.3f} "
                       f"({100 * (r['ppl_ratio'] - 1):+.2f}% vs full: {'within' if within else 'NOT within'} "
                       f"+3%); {'better' if better else 'NOT better'} than "
                       + ", ".join(f"{k} {v:.3f}" for k, v in rivals.items()))
    return out


def markdown(rows: List[Dict], meta: Dict) -> str:
    lines = [f"# pyramid_kv quality evaluation", "",
             f"Device: {meta.get('device')}; torch {meta.get('torch')}; windows per model: see below. "
             "Each window prefills n tokens with compression, then scores the next m tokens "
             "teacher-forced through decode steps on the compressed cache. `KV held` is the "
             "fraction of a full cache held, averaged over the m steps; `target` the budget the "
             "method was sized for; `(min)` marks a budget below the least the method can hold "
             "on that model and length (its smallest setting is used). Cross-layer sharing methods "
             "(kvsharer, pyramid+kvsharer) hold K/V in slots only: readers count 0 bytes. Merging "
             "methods (minicache, pyramid+minicache) count bytes: shared directions once, norms, "
             "retained rows and indices, raw decode tails. `pyramid-evict` is an ablation: "
             "PyramidInfer's recent-query votes used only to evict from per-layer caches under a "
             "budget, every layer computing on all prompt tokens.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        s = meta["settings"][model]
        full = next(r["full_ppl"] for r in rows if r["model"] == model)
        lines += [f"## {model}", "",
                  f"{s['windows']} windows of n={s['prompt_len']} + m={s['new_tokens']} tokens from "
                  f"`{s['data']}`; full-cache perplexity {full:.4f}.", "",
                  "| method | target | KV held | ppl | vs full | top-1 agree | KL (nats) |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["model"] == model:
                held = f"{r['fraction']:.1%}"
                if r["min_fraction"] > r["target"] + 1e-9:
                    held += " (min)"  # the method cannot go below this here
                lines.append(f"| {r['method']} | {r['target']:.0%} | {held} | {r['ppl']:.4f} | "
                             f"{100 * (r['ppl_ratio'] - 1):+.2f}% | {r['agreement']:.3f} | {r['kl']:.4f} |")
        shared = [r for r in rows if r["model"] == model and (r.get("config") or {}).get("sharing")]
        if shared:
            lines += ["", "Sharing plans (layer i reads layer sources[i]'s K/V; KVSharer, calibrated on "
                      "sentences apart from the windows):", ""]
            lines += [f"- {r['method']} @ {r['target']:.0%}: `{r['config']['sharing']}`" for r in shared]
        lines += ["", "Claim check (budgets <= 50%):", ""] + (verdicts(rows, model) or ["- (no budget <= 50%)"]) + [""]
    return "\n".join(lines)


def plots(rows: List[Dict], out: Path) -> List[Path]:
    """quality_vs_kv.png and pyramid.png (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    models = list(dict.fromkeys(r["model"] for r in rows))
    paths = []
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model):
            pts = sorted((r["fraction"], r["ppl_ratio"]) for r in rows if r["model"] == model and r["method"] == method)
            ax.plot([100 * x for x, _ in pts], [100 * (y - 1) for _, y in pts], marker="o", label=method)
        ax.axhline(3, color="grey", ls=":", lw=1)
        ax.set_title(model)
        ax.set_xlabel("KV cache held (% of full, mean over decode steps)")
        ax.set_ylabel("continuation perplexity vs full cache (%)")
        ax.set_yscale("symlog", linthresh=5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "quality_vs_kv.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in rows:
            if r["model"] == model and r["method"] in PYRAMID + ("full",) and r["target"] in (1.0, 0.45) \
                    and not (r["method"] != "full" and r["target"] == 1.0) and r["layer_tokens"]:
                if r["method"] == "full" and r["target"] != 1.0:
                    continue
                ax.plot(r["layer_tokens"], marker=".", label=f"{r['method']} @ {r['target']:.0%}")
        ax.set_title(f"{model}: tokens cached per layer after decoding")
        ax.set_xlabel("layer")
        ax.set_ylabel("tokens per sequence")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "pyramid.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write(rows: List[Dict], meta: Dict, out: Path) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows, meta))
    return [out / "results.json", out / "results.md"] + plots(rows, out)
