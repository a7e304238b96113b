"""The PyramidInfer runner over real and random Llama-family models (CPU in CI; CUDA/bf16 too)."""

import math

import pytest
import torch

import pyramid_kv as pk
from pyramid_kv import PyramidConfig
from pyramid_kv.generate import batch_prompts
from helpers import devices
from models import MODEL_NAMES, load, small


def setup(name, device, dtype=None):
    """The model on `device`: bfloat16 on CUDA unless a dtype is asked for, float32 on CPU."""
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return load(name, device, dtype)


def bf16_tie(logits: torch.Tensor) -> bool:
    """Whether the two best logits are within three bfloat16 steps of each other: a place where
    rounding differences between two correct bf16 pipelines may pick either token."""
    top2 = logits.float().topk(2).values
    step = 2.0 ** (math.floor(math.log2(max(abs(float(top2[0])), 1e-3))) - 7)
    return float(top2[0] - top2[1]) <= 3 * step


# GPU matrix products are not batch-invariant (cuBLAS picks kernels by shape) and bf16 rounds at
# 1/128, so exact-token comparisons on CUDA run in float32; in bf16 the first divergence from
# transformers must be at a bf16 tie.
EXACT_DTYPES = [pytest.param("cpu", torch.float32, id="cpu"),
                pytest.param("cuda", torch.float32, marks=pytest.mark.cuda, id="cuda-f32"),
                pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda, id="cuda-bf16")]


@pytest.mark.parametrize("device,dtype", EXACT_DTYPES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_compression_off_matches_transformers_generate(device, dtype, name):
    model, prompts = setup(name, device, dtype)
    out = pk.generate(model, prompts, "full", max_new_tokens=20)
    for p, toks in zip(prompts, out.tokens):
        ids = torch.tensor([p], device=model.device)
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                            output_scores=True, return_dict_in_generate=True)
        ref = hf.sequences[0, len(p):].tolist()
        n = len(ref) if toks == ref else next(i for i, (a, b) in enumerate(zip(toks, ref)) if a != b)
        if dtype == torch.float32 or n == len(ref):
            assert toks == ref
        else:
            assert bf16_tie(hf.scores[n][0]), f"diverged from transformers at token {n} without a tie"
    assert out.stats.fraction == pytest.approx(1.0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("selection", ["count", "mass"])
def test_ragged_batch_invariance(device, name, selection):
    """With compression on, each sequence of a ragged batch yields the tokens it yields alone
    (in float32: see EXACT_DTYPES)."""
    model, prompts = setup(name, device, torch.float32)
    cfg = small(selection=selection, decay=0.5 if selection == "count" else 0.8)
    batch = pk.generate(model, prompts, cfg, max_new_tokens=30, stop_tokens=[])
    assert batch.stats.fraction < 0.95
    for p, toks in zip(prompts, batch.tokens):
        alone = pk.generate(model, [p], cfg, max_new_tokens=30, stop_tokens=[])
        assert alone.tokens[0] == toks


def expected_prefill_lengths(n, cfg, num_layers):
    """Per-layer input lengths of one sequence, from the definitions in docs/ops.md and config."""
    keep = cfg.layer_keep(num_layers)
    out = [n]
    for layer in range(num_layers - 1):
        if cfg.compresses(layer, num_layers):
            recent = min(n, max(1, math.ceil(cfg.recent_ratio * n)))
            c = n - recent
            forced = min(cfg.sinks, c)
            cand = c - forced
            r = min(math.ceil(keep[layer] * c), cand)
            r = min(max(r, cfg.min_context - forced, 0), cand)
            n = forced + r + recent
        out.append(n)
    return out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pyramid_follows_schedule_and_keeps_sinks_and_recent(device, name):
    model, prompts = setup(name, device)
    L = model.config.num_hidden_layers
    cfg = PyramidConfig(schedule="list", layer_ratios=[0.8, 0.6, 1.0, 0.4, 0.5][:L] + [0.5] * (L - 5),
                        first_layer=0, interval=1, recent_ratio=0.25, sinks=3, min_context=6,
                        decode=False).validate()
    runner = pk.Runner(model, cfg, track_positions=True)
    ids, lens = batch_prompts(prompts)
    runner.prefill(ids, lens, 0)
    per_layer = torch.stack(runner._prefill_lengths).cpu()  # [L, B]
    for b, n in enumerate(lens.tolist()):
        expect = expected_prefill_lengths(n, cfg, L)
        assert per_layer[:, b].tolist() == expect
        assert [int(c.lengths[b]) for c in runner.layers] == expect  # each layer caches its inputs
        # Deeper layers really process fewer tokens wherever the schedule keeps < 1.
        for layer in range(L - 1):
            if cfg.layer_ratios[layer] < 1 and expect[layer] > cfg.min_context + 2 * cfg.sinks:
                assert expect[layer + 1] < expect[layer]
        for layer, c in enumerate(runner.layers):
            pos = c.positions[b, 0, : expect[layer], 0].tolist()
            assert pos == sorted(pos) and len(set(pos)) == len(pos)
            assert pos[: min(cfg.sinks, n)] == list(range(min(cfg.sinks, n)))  # sinks
            assert pos[-1] == n - 1  # the last prompt token always goes on
            if layer + 1 < L:  # the layer's recent window is passed on whole
                recent = min(expect[layer], max(1, math.ceil(cfg.recent_ratio * expect[layer])))
                nxt = runner.layers[layer + 1].positions[b, 0, : expect[layer + 1], 0].tolist()
                assert nxt[-recent:] == pos[-recent:]
                assert set(nxt) <= set(pos)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("per_head", [True, False])
def test_decode_compression_keeps_prompt_pvcs(device, per_head):
    model, prompts = setup("stories260K", device)
    cfg = small(per_head=per_head)
    runner = pk.Runner(model, cfg, track_positions=True)
    ids, lens = batch_prompts(prompts)
    logits = runner.prefill(ids, lens, 48)

    def prompt_positions():
        out = []
        for c in runner.layers:
            rows = []
            for b, n in enumerate(lens.tolist()):
                for h in range(c.positions.shape[1]):
                    p = c.positions[b, h, : int(c.lengths[b]), 0].tolist()
                    rows.append([x for x in p if x < n])
            out.append(rows)
        return out

    before = prompt_positions()
    for _ in range(48):
        logits = runner.decode_step(logits.argmax(-1))
    assert prompt_positions() == before
    # Every layer compressed its decode tokens; deeper layers keep fewer of them.
    kept = [int(c.lengths[0]) - len(rows[0]) for c, rows in zip(runner.layers, before)]
    assert all(k < 48 for k in kept), kept
    assert kept[-1] < kept[0]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("policy", ["pyramid", "h2o", "streaming", "snapkv"])
def test_budget_policies_bound_every_layer(device, policy):
    model, prompts = setup("random-llama", device)
    budget, steps = 64, 40
    cfg = small(kv_budget=budget, budget_policy=policy, enabled=policy == "pyramid")
    runner = pk.Runner(model, cfg, track_positions=True)
    ids, lens = batch_prompts(prompts)
    logits = runner.prefill(ids, lens, steps)
    for step in range(steps + 1):
        for c in runner.layers:
            limit = budget + step if policy == "snapkv" else budget  # SnapKV trims the prompt only
            assert c.bound <= limit and int(c.lengths.max()) <= limit
            for b, n in enumerate(lens.tolist()):
                for h in range(c.positions.shape[1]):
                    pos = c.positions[b, h, : int(c.lengths[b]), 0].tolist()
                    assert pos == sorted(pos) and pos[-1] == n - 1 + step
                    if policy in ("pyramid", "streaming"):
                        assert pos[:2] == [0, 1]  # sinks
                    if policy == "streaming":  # sinks + the most recent tokens, nothing else
                        assert pos[2:] == list(range(n + step - len(pos) + 2, n + step))
        if step < steps:
            logits = runner.decode_step(logits.argmax(-1))


def test_bad_configurations():
    bad = [dict(recent_ratio=0), dict(recent_ratio=1.5), dict(decay=0), dict(decay=1.2),
           dict(decode_keep=1.5), dict(selection="random"), dict(schedule="zigzag"), dict(interval=0),
           dict(sinks=-1), dict(min_context=2.5), dict(decode_chunk=0), dict(recent_weighting="exp"),
           dict(schedule="list"), dict(layer_ratios=[0.5, 1.5]), dict(kv_budget=0), dict(power=-1)]
    for kw in bad:
        with pytest.raises(ValueError, match=list(kw)[0] if list(kw)[0] != "schedule" or "zigzag" in str(kw) else "layer_ratios"):
            PyramidConfig(**kw).validate()
    model, _ = load("stories260K")
    with pytest.raises(ValueError, match="layer_ratios has 3 entries but the model has 5 layers"):
        pk.Runner(model, PyramidConfig(schedule="list", layer_ratios=[0.5] * 3))
    with pytest.raises(ValueError, match="kv_budget has 2 entries"):
        pk.Runner(model, PyramidConfig(kv_budget=[100, 100]))
    with pytest.raises(ValueError, match="kv_budget for layer 0 .* must be at least"):
        pk.Runner(model, PyramidConfig(kv_budget=20))
    with pytest.raises(ValueError, match="unknown preset"):
        pk.preset("nope")
    with pytest.raises(ValueError, match="unknown PyramidConfig fields"):
        PyramidConfig.from_dict({"recent_ratio": 0.2, "bogus": 1})
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        pk.Runner(gpt2, PyramidConfig())


def test_config_json_roundtrip_and_presets():
    for name, cfg in pk.PRESETS.items():
        again = PyramidConfig.from_json(cfg.to_json())
        assert again == cfg and again.name == name
    cfg = pk.preset("kv45", selection="mass", kv_budget=[128] * 4)
    assert PyramidConfig.from_dict(cfg.to_dict()) == cfg
    keep = pk.preset("paper-7b").layer_keep(32)
    assert keep[0] == 1.0 and keep[-1] == pytest.approx(0.9, abs=1e-3) and keep == sorted(keep, reverse=True)
    lin = PyramidConfig(schedule="linear", decay=0.5).layer_keep(4)
    assert lin == [1.0, 0.875, 0.75, 0.625]  # truly linear (the reference code's was constant)


@pytest.mark.parametrize("budget", [None, 96])
def test_cache_sizes_match_plan(budget):
    """pyramid_kv.plan predicts every layer's cache size in count mode (capacity planning)."""
    from pyramid_kv import plan

    model, prompts = setup("random-llama", "cpu")
    cfg = small(kv_budget=budget)
    L = model.config.num_hidden_layers
    batches = [[p] for p in prompts] if budget else [prompts]  # budget timing is batch-wide
    for batch in batches:
        out = pk.generate(model, batch, cfg, max_new_tokens=41, stop_tokens=[])
        runner_lengths = [[round(t) for t in out.stats.layer_tokens]] if len(batch) == 1 else None
        if runner_lengths is None:  # per sequence from a fresh runner
            r = pk.Runner(model, cfg)
            ids, lens = batch_prompts(batch)
            logits = r.prefill(ids, lens, 41)
            for _ in range(40):
                logits = r.decode_step(logits.argmax(-1))
            runner_lengths = torch.stack([c.lengths for c in r.layers]).T.tolist()
        for p, got in zip(batch, runner_lengths):
            assert got == plan.cache_lengths(cfg, L, len(p), 41)
