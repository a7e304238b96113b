"""The quality harness: exact full-cache perplexity, honoured budgets, every method, reports."""

import json
import math

import pytest
import torch

from pyramid_kv import evaluate as ev
from pyramid_kv import eval_report, plan
from models import STORIES, TINYSTORIES, load

N, M = 96, 16


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoTokenizer

    model, _ = load("stories260K")
    tok = AutoTokenizer.from_pretrained(STORIES)
    return model, ev.windows_from_text(tok, TINYSTORIES, N, M, 4)


def test_full_cache_perplexity_equals_plain_forward(setup):
    model, windows = setup
    s, _, _ = ev.score_windows(model, ev.preset("full"), windows, N)
    with torch.no_grad():
        logits = model(windows).logits[:, N - 1: N + M - 1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, N:].reshape(-1),
                                            reduction="sum")
    assert s.as_dict()["ppl"] == pytest.approx(math.exp(nll.item() / windows[:, N:].numel()), rel=1e-5)
    assert s.as_dict()["fraction"] == pytest.approx(1.0)


def test_budgets_are_honoured_and_every_method_runs(setup, tmp_path):
    model, windows = setup
    L = model.config.num_hidden_layers
    settings = ev.EvalSettings(N, M, windows=4, batch_size=2, budgets=(1.0, 0.6, 0.45))
    rows = ev.evaluate_model(model, windows, settings, progress=False, label="stories260K")
    assert {r["method"] for r in rows} == set(ev.METHODS) and len(rows) == len(ev.METHODS) * 3
    for r in rows:
        assert math.isfinite(r["ppl"]) and 0 <= r["agreement"] <= 1 and r["kl"] >= -1e-6
        if r["target"] == 1.0:  # every method at a full budget is the full cache
            assert r["ppl"] == pytest.approx(r["full_ppl"], rel=1e-6) and r["fraction"] == pytest.approx(1.0)
            continue
        cfg = ev.PyramidConfig.from_dict(r["config"])
        reachable = r["min_fraction"] <= r["target"]
        if r["method"] == "pyramid-mass":  # calibrated by measurement on the first windows
            assert r["fraction"] <= max(r["target"], r["min_fraction"]) + 0.03
        else:  # sized exactly by the planner, unless even its smallest setting is larger
            assert r["fraction"] == pytest.approx(plan.mean_fraction(cfg, L, N, M), abs=1e-9)
            assert r["fraction"] <= r["target"] if reachable else r["fraction"] == pytest.approx(r["min_fraction"])
    meta = {"device": "cpu", "torch": torch.__version__,
            "settings": {"stories260K": {**ev.dataclasses.asdict(settings), "data": str(TINYSTORIES)}}}
    paths = eval_report.write(rows, meta, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["method"] == "full"
    md = (tmp_path / "results.md").read_text()
    assert "| pyramid-count | 45% |" in md and "Claim check" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "quality_vs_kv.png").stat().st_size > 1000 and (tmp_path / "pyramid.png") in paths


def test_sharing_methods_run_budget_matched(setup, tmp_path):
    """kvsharer and pyramid+kvsharer: plans calibrated on the file's last documents, slots-only
    fractions equal to the planner's, and the reports list the plans."""
    from transformers import AutoTokenizer

    model, windows = setup
    L = model.config.num_hidden_layers
    calibration = ev.calibration_from_text(AutoTokenizer.from_pretrained(STORIES), TINYSTORIES, 4, 64,
                                           windows.numel())
    settings = ev.EvalSettings(N, M, windows=2, batch_size=2, budgets=(1.0, 0.6),
                               methods=("full",) + ev.SHARING_METHODS, share_threshold=-1.0)
    rows = ev.evaluate_model(model, windows[:2], settings, progress=False, label="stories260K",
                             calibration=calibration)
    assert [r["method"] for r in rows] == ["full", "full", "kvsharer", "kvsharer",
                                           "pyramid+kvsharer", "pyramid+kvsharer"]
    for r in rows:
        assert math.isfinite(r["ppl"])
        if r["target"] < 1.0 and r["method"] != "full":
            cfg = ev.PyramidConfig.from_dict(r["config"])
            assert cfg.sharing_plan(L).readers  # threshold -1: calibration always shares
            assert r["fraction"] == pytest.approx(plan.mean_fraction(cfg, L, N, M), abs=1e-9)
            assert r["fraction"] <= 0.6 + 1e-9
    with pytest.raises(ValueError, match="share"):
        ev.method_config("kvsharer", 0.5, L, N, M)
    meta = {"device": "cpu", "torch": torch.__version__,
            "settings": {"stories260K": {**ev.dataclasses.asdict(settings), "data": str(TINYSTORIES)}}}
    eval_report.write(rows, meta, tmp_path)
    assert "| pyramid+kvsharer | 60% |" in (tmp_path / "results.md").read_text()
    assert "Sharing plans" in (tmp_path / "results.md").read_text()
