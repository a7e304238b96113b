"""Cross-layer KV sharing: plans, the runner's readers, accounting, KVSharer calibration (CPU)."""

import json

import pytest
import torch
import torch.nn.functional as F

import pyramid_kv as pk
from pyramid_kv.attention import shared_attention
from pyramid_kv.generate import batch_prompts
from pyramid_kv.sharing import SharingPlan, calibrate_kvsharer
from models import load, logits_trace, small

SHARED_PLAN = "0_0_2_2_2"  # 5-layer models: layer 1 reads 0, layers 3 and 4 read 2


# ---------------------------------------------------------------------- plans
def test_parse_roundtrip_and_structure():
    plan = SharingPlan.parse("0_0_2_2")
    assert plan.sources == (0, 0, 2, 2) and plan.to_string() == "0_0_2_2"
    assert plan.slots == (0, 2) and plan.readers == (1, 3) and not plan.is_identity
    assert SharingPlan.parse(SharingPlan.identity(4).to_string()) == SharingPlan.identity(4)
    assert SharingPlan.identity(3).is_identity
    cfg = pk.preset("kv45", sharing="0_0_2_2")
    assert pk.PyramidConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["sharing"] == "0_0_2_2"


@pytest.mark.parametrize("text,message", [
    ("0_0_1", "itself a reader"),
    ("1_0", "cycle"),
    ("0_5_2", "outside"),
    ("0_0s_2", "sliding-window"),
    ("0_x", "not an integer"),
    ("", "string like"),
])
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        SharingPlan.parse(text)


def test_runner_refuses_wrong_length_and_upper_reads():
    model, _ = load("random-llama")
    with pytest.raises(ValueError, match="5 layers"):
        pk.Runner(model, pk.preset("full", sharing="0_0_2_2"))
    with pytest.raises(ValueError, match="upper layer"):
        pk.Runner(model, pk.preset("full", sharing="1_1_2_3_4"))
    # A model trained for it may read upper layers: the structure alone is valid.
    assert SharingPlan.parse("1_1_2_3_4").validate(5, pretrained=False).readers == (0,)


# ---------------------------------------------------------------------- the runner
@pytest.mark.parametrize("name", ["stories260K", "random-qwen3"])
@pytest.mark.parametrize("base", ["full", "small"])
def test_identity_plan_is_exactly_unshared(name, base):
    model, prompts = load(name)
    cfg = pk.preset("full") if base == "full" else small()
    L = model.config.num_hidden_layers
    plain, _ = logits_trace(model, cfg, prompts, track_positions=True)
    ident, _ = logits_trace(model, cfg.replace(sharing=SharingPlan.identity(L).to_string()), prompts,
                             track_positions=True)
    assert torch.equal(plain, ident)


def test_readers_store_nothing_and_stats_count_slots():
    model, prompts = load("random-llama")
    _, runner = logits_trace(model, small(sharing=SHARED_PLAN), prompts, track_positions=True)
    st = runner.stats()
    for reader, slot in [(1, 0), (3, 2), (4, 2)]:
        assert runner.layers[reader] is runner.layers[slot]
        assert st.layer_bytes[reader] == 0 and st.layer_allocated[reader] == 0
        assert st.layer_tokens[reader] == st.layer_tokens[slot]
    per_token = model.config.num_key_value_heads * 64 * 2 * 4
    held = sum(int(runner.layers[s].lengths.sum()) for s in (0, 2)) * per_token
    assert st.occupied_bytes == held and st.fraction == pytest.approx(held / st.full_bytes)
    assert st.full_bytes == 5 * int((runner.prompt_lengths + runner.generated).sum()) * per_token


def _reference_logits(model, ids, sources):
    """A plain forward of one unpadded sequence [1, n] where layer i attends with the K/V that
    layer sources[i] computed (HF modules and RoPE; no runner code): logits at every position."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    base = model.model
    h = base.embed_tokens(ids)
    n = ids.shape[1]
    cos, sin = base.rotary_emb(h, torch.arange(n)[None])
    kv = {}
    for i, layer in enumerate(base.layers):
        attn, x = layer.self_attn, layer.input_layernorm(h)
        split = lambda t: t.view(1, n, -1, attn.head_dim).transpose(1, 2)  # noqa: E731
        q, k = apply_rotary_pos_emb(split(attn.q_proj(x)), split(attn.k_proj(x)), cos, sin)
        kv[i] = (k, split(attn.v_proj(x)))
        k, v = kv[sources[i]]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=attn.scaling)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(1, n, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(base.norm(h)).float()[0]


def test_reader_equals_a_plain_reference():
    """Without token compression, prefill and teacher-forced decode of a shared plan equal a plain
    forward that feeds each reader its source layer's K/V."""
    model, prompts = load("random-llama")
    p = prompts[1]
    with torch.no_grad():
        ref = _reference_logits(model, torch.tensor([p]), SharingPlan.parse(SHARED_PLAN).sources)
        runner = pk.Runner(model, pk.preset("full", sharing=SHARED_PLAN))
        got = [runner.prefill(torch.tensor([p[:100]]), torch.tensor([100]), 50)[0]]
        for t in range(100, len(p)):
            got.append(runner.decode_step(torch.tensor([p[t]]))[0])
    # float32 summation order differs (SDPA vs the runner's decode path): 1e-3 on logits of ~10,
    # while sharing itself moves them by far more.
    torch.testing.assert_close(torch.stack(got), ref[99:], atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        unshared = _reference_logits(model, torch.tensor([p]), tuple(range(5)))
    assert (unshared - ref).abs().max() > 0.1


def test_shared_attention_masks_on_original_positions():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, N, D = 2, 4, 2, 9, 8
    k, v = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    k_pos = torch.arange(N).expand(B, N)
    k_lens = torch.tensor([9, 6])
    q_pos = torch.tensor([[0, 3, 5, 8], [1, 2, 5, 0]])  # sequence 1: 3 queries, then padding
    q_lens = torch.tensor([4, 3])
    q = torch.randn(B, Hq, 4, D, generator=g)
    k[1, :, 6:] = 1e4  # padding keys: never attended
    out = shared_attention(q, k, v, q_pos, q_lens, k_pos, k_lens, 0.3)
    assert torch.isfinite(out).all()
    for b in range(B):
        for i in range(int(q_lens[b])):
            see = int(q_pos[b, i]) + 1
            kk, vv = k[b].repeat_interleave(2, 0)[:, :see], v[b].repeat_interleave(2, 0)[:, :see]
            ref = ((q[b, :, i:i + 1] @ kk.transpose(1, 2)) * 0.3).softmax(-1) @ vv
            torch.testing.assert_close(out[b, :, i:i + 1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("selection", ["count", "mass"])
def test_dropping_and_sharing_ragged_batch_invariance(selection):
    """Token dropping between a slot (2) and its readers (3, 4): each sequence of a ragged batch
    yields the tokens it yields alone, and the padding's content never matters."""
    model, prompts = load("random-llama")
    cfg = small(selection=selection, decay=0.5 if selection == "count" else 0.8, sharing=SHARED_PLAN)
    batch = pk.generate(model, prompts, cfg, max_new_tokens=24, stop_tokens=[])
    for p, toks in zip(prompts, batch.tokens):
        assert pk.generate(model, [p], cfg, max_new_tokens=24, stop_tokens=[]).tokens[0] == toks
    ids, lengths = batch_prompts(prompts)
    runner = pk.Runner(model, cfg)
    a = runner.prefill(ids, lengths, 4)
    prefill = [int(x[0]) for x in runner._prefill_lengths]
    assert prefill[3] < prefill[2] and prefill[4] < prefill[3]  # the readers hold subsets
    junk = ids.clone()
    junk[torch.arange(ids.shape[1])[None] >= lengths[:, None]] = 999
    assert torch.equal(a, pk.Runner(model, cfg).prefill(junk, lengths, 4))


def test_graph_shaped_decode_step_with_sharing():
    """The CUDA-graph step (attention over each slot's whole capacity, lengths masking) gives the
    eager step's logits with readers: checked on CPU by forcing its shapes."""
    model, prompts = load("random-llama")
    cfg = small(sharing=SHARED_PLAN)
    eager, _ = logits_trace(model, cfg, prompts, steps=20, track_positions=True)
    shaped, _ = logits_trace(model, cfg, prompts, steps=20, graph_shaped=True, track_positions=True)
    torch.testing.assert_close(shaped, eager, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- KVSharer
def test_calibration_threshold_and_target():
    model, prompts = load("random-llama")
    calib = [p[:40] for p in prompts]
    assert calibrate_kvsharer(model, calib, threshold=1.0).is_identity
    plan = calibrate_kvsharer(model, calib, threshold=-1.0, max_readers=2)
    assert len(plan.readers) == 2 and plan.validate(5, pretrained=True) is plan
    plan = calibrate_kvsharer(model, calib, threshold=-1.0, target_fraction=0.6)
    assert len(plan.slots) <= 3 and len(plan.slots) / 5 <= 0.6
    # An accepted plan keeps the final hidden states within the threshold.
    from pyramid_kv.sharing import _cosine, _final_hidden

    ids, lengths = batch_prompts(calib)
    plan = calibrate_kvsharer(model, ids, lengths, threshold=0.5)
    ref = _final_hidden(pk.Runner(model), ids, lengths)
    got = _final_hidden(pk.Runner(model, pk.preset("full", sharing=plan.to_string())), ids, lengths)
    assert _cosine(got, ref, lengths) >= 0.5


@pytest.mark.parametrize("name", ["stories260K", "random-qwen3"])
def test_q_only_equals_the_full_projection(name):
    """A reader's queries (q norm for Qwen3, RoPE at given positions) are the layer's own."""
    model, _ = load(name)
    a = pk.Runner(model).adapter
    x = torch.randn(2, 7, a.shape.hidden_size)
    cos, sin = a.rope(x, torch.tensor([[0, 1, 2, 5, 8, 9, 30]] * 2))
    layer = a.layers[1]
    with torch.no_grad():
        assert torch.equal(a.q_only(layer, x, cos, sin), a.qkv(layer, x, cos, sin)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_decode_with_sharing(dtype):
    """On the GPU, on the CPU run's tokens: CUDA-graph replay gives the eager steps' logits, and
    in float32 both give the CPU's."""
    cfg = small(sharing=SHARED_PLAN)
    cpu_model, prompts = load("random-llama")
    cpu, _ = logits_trace(cpu_model, cfg, prompts, steps=20)
    model, _ = load("random-llama", "cuda", dtype)
    graphs, runner = logits_trace(model, cfg, prompts, steps=20, feed=cpu)
    assert runner._graph is not None  # the later steps replayed a captured graph
    eager, _ = logits_trace(model, cfg, prompts, steps=20, feed=cpu, cuda_graphs=False)
    # bf16: the same kernels in both, but a rounding flip may propagate; stale or misplaced rows
    # would move logits by O(1).
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(graphs.float(), eager.float(), **tol)
    if dtype == torch.float32:
        torch.testing.assert_close(graphs.cpu(), cpu, atol=2e-3, rtol=2e-3)
