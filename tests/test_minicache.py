"""MiniCache cross-layer merging in the runner: exactness, restoration, accounting, eval (CPU)."""

import math

import pytest
import torch

import pyramid_kv as pk
from pyramid_kv import evaluate as ev
from pyramid_kv.generate import batch_prompts
from models import load, logits_trace, small


RESTORE = {"attention": "restore"}


def test_retaining_every_token_is_exactly_unmerged():
    """Restore mode rebuilds the unmerged cache bit for bit."""
    model, prompts = load("random-llama")
    plain, _ = logits_trace(model, pk.preset("full"), prompts)
    merged, runner = logits_trace(model, pk.preset("full", merge={"start": 1, "retain": 1.0, **RESTORE}), prompts)
    assert sorted(runner.merged) == [1, 3] and torch.equal(plain, merged)
    # With the pyramid: the unmerged reference keeps everything where the merged run may not drop
    # (layer 3 in prefill, layers 3-4 in decode), so both hold the same tokens.
    ratios = [0.6, 0.5, 0.4, 1.0, 0.3]
    base = small(schedule="list", layer_ratios=ratios, decode_layer_ratios=[0.9, 0.8, 0.6, 1.0, 1.0])
    plain, _ = logits_trace(model, base, prompts, steps=24)
    merged, runner = logits_trace(model, base.replace(merge={"start": 3, "retain": 1.0, **RESTORE}), prompts, steps=24)
    assert list(runner.merged) == [3] and torch.equal(plain, merged)
    assert int(runner.layers[1].lengths[0]) < int(runner.prompt_lengths[0]) + 24  # layer 1 compressed
    merged0, _ = logits_trace(model, base.replace(merge={"start": 3, "retain": 0.0}), prompts, steps=24)
    assert (merged0 - plain).abs().max() > 1e-2  # merging does change the outputs


@pytest.mark.parametrize("t,layer", [(0.0, 0), (1.0, 1)])
def test_extreme_t_restores_that_layer(t, layer):
    """t = 0 (1) with nothing retained restores layer l's (l + 1's) keys and values, up to float32
    rounding; the other layer gets the wrong directions."""
    model, prompts = load("random-llama")
    ids, lengths = batch_prompts(prompts)
    runs = {}
    for retain in (1.0, 0.0):
        r = pk.Runner(model, small(merge={"start": 1, "t": t, "retain": retain, **RESTORE}))
        r.prefill(ids, lengths, 4)
        runs[retain] = r
    pair = runs[0.0].merged[1]
    P = pair.bound
    valid = torch.arange(P)[None, :] < pair.lengths[:, None]  # [B, P]
    for which in (0, 1):
        got = [x[:, :P][valid].clone() for x in _restored(runs[0.0], which)]
        ref = [x[:, :P][valid].clone() for x in _restored(runs[1.0], which)]
        for g, e in zip(got, ref):
            if which == layer:
                torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
            else:
                assert (g - e).abs().max() > 1e-2


def _restored(runner, which):
    pair = runner.merged[1]
    ws = pair.restore(which, runner.workspace, runner.layers[pair.layers[which]], graph=False)
    return ws.k_store, ws.v_store


@pytest.mark.parametrize("merge,message", [
    ({"begin": 2}, "unknown merge keys"),
    ({"t": 1.5}, r"merge\['t'\]"),
    ({"retain": -0.1}, r"merge\['retain'\]"),
    ({"start": -1}, r"merge\['start'\]"),
    ("2", "must be None or a dict"),
    ({"attention": "fused"}, r"merge\['attention'\] must be one of"),
])
def test_config_errors(merge, message):
    with pytest.raises(ValueError, match=message):
        pk.preset("full", merge=merge)


def test_config_errors_against_the_model_and_other_features():
    model, _ = load("random-llama")
    with pytest.raises(ValueError, match="no pair"):
        pk.Runner(model, pk.preset("full", merge={"start": 4}))
    with pytest.raises(ValueError, match="sharing plan"):
        pk.Runner(model, pk.preset("full", sharing="0_0_2_2_2", merge={"start": 1}))
    with pytest.raises(ValueError, match="kv_budget"):
        pk.preset("full", kv_budget=64, merge={})
    from pyramid_kv import plan
    with pytest.raises(ValueError, match="measure"):
        plan.kv_fraction(pk.preset("full", merge={}), 5, 100, 10)
    cfg = small(merge={"start": 1, "retain": 0.2})
    assert pk.PyramidConfig.from_json(cfg.to_json()) == cfg
    assert cfg.merged_pairs(5) == [(1, 2), (3, 4)] and pk.preset("full", merge={}).merged_pairs(6) == [(3, 4)]
    assert not cfg.compresses(1, 5) and not cfg.compresses(3, 5) and cfg.compresses(2, 5)


@pytest.mark.parametrize("attention", ["direct", "restore"])
def test_bytes_match_a_hand_count(attention):
    model, prompts = load("random-llama")
    steps, retain = 10, 0.1
    _, runner = logits_trace(model, small(merge={"start": 3, "retain": retain, "attention": attention}), prompts,
                             steps=steps)
    st = runner.stats()
    H, D, e = model.config.num_key_value_heads, 64, 4
    row = 2 * H * D * e  # K and V of one token, one layer
    pair = runner.merged[3]
    lens = [int(x) for x in pair.lengths]
    tail = steps  # decode tokens appended after prefill, raw, in each merged layer
    retained = [H * math.ceil(retain * n) for n in lens]  # (sequence, head) rows, per layer
    # layer 3: shared directions (K and V), its norms (2 float32 per token and head), its retained
    # K/V rows and the pair's int64 indices; layer 4: norms and retained rows. Plus the raw tails.
    l3 = sum(n * row + n * 2 * H * 4 + r * 2 * D * e + r * 8 + tail * row for n, r in zip(lens, retained))
    l4 = sum(n * 2 * H * 4 + r * 2 * D * e + tail * row for n, r in zip(lens, retained))
    assert (st.layer_bytes[3], st.layer_bytes[4]) == (l3, l4)
    unmerged = sum(int(runner.layers[i].lengths.sum()) for i in range(3)) * row
    assert st.occupied_bytes == unmerged + l3 + l4 == int(runner.held_bytes().sum())
    assert st.layer_tokens[3] == pytest.approx(sum(lens) / 3 + tail)
    ws_rows = pair.bound + steps  # prefill room for max_new_tokens = steps
    if attention == "restore":
        assert st.workspace_bytes == 3 * ws_rows * row and st.allocated_bytes > st.workspace_bytes
    else:  # direct attention needs no workspace
        assert runner.workspace is None and st.workspace_bytes == 0
    assert st.fraction < 1.0


def test_ragged_batch_invariance_with_merging():
    model, prompts = load("random-llama")
    cfg = small(merge={"start": 1, "retain": 0.1})
    batch = pk.generate(model, prompts, cfg, max_new_tokens=20, stop_tokens=[])
    for p, toks in zip(prompts, batch.tokens):
        assert pk.generate(model, [p], cfg, max_new_tokens=20, stop_tokens=[]).tokens[0] == toks


@pytest.mark.parametrize("attention", ["direct", "restore"])
def test_graph_shaped_decode_step_with_merging(attention):
    """The CUDA-graph step (whole tail capacity restored, lengths masking) equals the eager one."""
    model, prompts = load("random-llama")
    cfg = small(merge={"start": 1, "retain": 0.1, "attention": attention})
    eager, _ = logits_trace(model, cfg, prompts, steps=16)
    shaped, _ = logits_trace(model, cfg, prompts, steps=16, graph_shaped=True)
    torch.testing.assert_close(shaped, eager, atol=1e-4, rtol=1e-4)


def test_tiny_eval_of_the_merging_methods():
    from transformers import AutoTokenizer
    from models import STORIES, TINYSTORIES

    model, _ = load("stories260K")
    windows = ev.windows_from_text(AutoTokenizer.from_pretrained(STORIES), TINYSTORIES, 64, 8, 2)
    settings = ev.EvalSettings(64, 8, windows=2, batch_size=2, budgets=(1.0, 0.8),
                               methods=ev.MERGE_METHODS)
    rows = ev.evaluate_model(model, windows, settings, progress=False, label="stories260K")
    assert [r["method"] for r in rows] == ["minicache"] * 2 + ["pyramid+minicache"] * 2
    for r in rows:
        assert math.isfinite(r["ppl"]) and 0 < r["fraction"] <= 1.0 + 1e-9
        if r["target"] < 1.0:
            assert r["config"]["merge"] is not None
            assert r["fraction"] < 1.0 and r["fraction"] <= max(r["target"], r["min_fraction"]) + 1e-9


def test_direct_attention_equals_restore():
    """Attending over the merged slot (ops.merged_attention) gives the restore path's logits up to
    float32 summation order, over prefill and decode steps, with the pyramid dropping tokens."""
    model, prompts = load("random-llama")
    for merge in ({"start": 1, "retain": 0.1}, {"start": 3, "retain": 0.0, "t": 0.3}):
        restore, _ = logits_trace(model, small(merge={**merge, **RESTORE}), prompts, steps=16)
        direct, runner = logits_trace(model, small(merge=merge), prompts, steps=16, feed=restore)
        assert runner.workspace is None and runner.merged
        torch.testing.assert_close(direct, restore, atol=1e-4, rtol=1e-4)


def test_direct_attention_retaining_every_token_matches_unmerged():
    model, prompts = load("random-llama")
    plain, _ = logits_trace(model, pk.preset("full"), prompts, steps=16)
    merged, runner = logits_trace(model, pk.preset("full", merge={"start": 1, "retain": 1.0}), prompts, steps=16,
                                  feed=plain)
    assert sorted(runner.merged) == [1, 3] and runner.workspace is None
    # every prompt token flagged: the merged directions are never read
    assert all(bool((p.norms[:, 0][:, p.lengths[:, None] > torch.arange(p.bound)] < 0).all())
               for p in runner.merged.values())
    torch.testing.assert_close(merged, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("attention", ["direct", "restore"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_decode_with_merging(dtype, attention):
    """On the GPU (CUDA merge and merged-attention kernels), on the CPU run's tokens: CUDA-graph
    replay (fixed shapes: the whole tail) gives the eager steps' logits, and in float32 both give
    the CPU's."""
    cfg = small(merge={"start": 1, "retain": 0.1, "attention": attention})
    cpu_model, prompts = load("random-llama")
    cpu, _ = logits_trace(cpu_model, cfg, prompts, steps=16)
    model, _ = load("random-llama", "cuda", dtype)
    graphs, runner = logits_trace(model, cfg, prompts, steps=16, feed=cpu)
    assert runner._graph is not None and sorted(runner.merged) == [1, 3]
    eager, _ = logits_trace(model, cfg, prompts, steps=16, feed=cpu, cuda_graphs=False)
    # bf16: the same kernels in both, but a rounding flip may propagate; stale or misplaced rows
    # would move logits by O(1).
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(graphs.float(), eager.float(), **tol)
    if dtype == torch.float32:
        torch.testing.assert_close(graphs.cpu(), cpu, atol=2e-3, rtol=2e-3)
