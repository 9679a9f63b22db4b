"""The live page's Analysis card without a browser, on the real MiniLM and the trained zoo organism
``zoo:induction-2l``: score grids against the analysis run on a fresh capture and a numpy oracle, attribution
against the library's flow / relevance called directly, patching against ``activation_patching`` called directly
and a hand-made patch with plain hooks, the errors a person sees, and saving into the results folder."""

import numpy as np
import pytest
import torch

import attnscope
from attnscope.circuits.flow import attention_flow
from attnscope.circuits.patch_pairs import PatchPairs
from attnscope.circuits.patching import activation_patching
from attnscope.circuits.relevance_propagation import relevance
from attnscope.dashboards import live_analysis as la
from attnscope.dashboards.files import ResultsRoot
from attnscope.dashboards.live_analysis_callbacks import patch_figure, score_figure
from attnscope.dashboards.live_state import LiveSession
from attnscope.datasets import PromptItem, PromptSuite
from attnscope.errors import InputError
from attnscope.tasks.analyses import get_analysis, run_analysis
from attnscope.viz.heads import head_values

TEXT = "The cat sat on the mat because it was warm, and the dog watched it from the door."
CLEAN = [5, 9, 17, 3, 44, 60, 5, 9, 17, 3]          # a repeat: the induction organism predicts 44 next
CORRUPT = [5, 9, 17, 3, 44, 60, 6, 10, 18, 4]       # same length, the repeat broken


@pytest.fixture(scope="module")
def induction(session):
    return session.model("zoo:induction-2l"), session.capture("zoo:induction-2l", " ".join(map(str, CLEAN)), "ids")


def test_score_grid_equals_the_analysis_on_a_fresh_capture(cap, minilm):
    result = la.score(minilm, cap, "head-stats")
    assert result.metrics() == ["entropy", "sink_mass"] and result.grid().shape == (6, 12)
    attn = attnscope.capture(minilm, TEXT).stack()[:, 0].double().numpy()  # [layer, head, query, key]
    np.testing.assert_allclose(result.grid("sink_mass"), attn[..., 0].mean(-1), atol=1e-5)
    entropy = -(attn * np.log(np.clip(attn, 1e-30, None))).sum(-1).mean(-1)
    np.testing.assert_allclose(result.grid("entropy"), entropy, atol=1e-4)
    ids = minilm.tokenizer(TEXT)["input_ids"]
    for name in ("prev-token", "sinks"):
        page = la.score(minilm, cap, name)
        fresh = run_analysis(get_analysis(name), minilm, PromptSuite("fresh", [PromptItem(ids=ids)]),
                             offered={"progress": False})
        for metric in page.metrics():
            np.testing.assert_allclose(page.grid(metric), head_values(fresh, metric).to_numpy(), atol=1e-6)
    prev = la.score(minilm, cap, "prev-token").grid()  # analytic: mass on t-1, rows 1..n-1 (rows normalised)
    np.testing.assert_allclose(prev, np.stack([attn[..., t, t - 1] for t in range(1, len(ids))], -1).mean(-1),
                               atol=1e-5)


def test_score_on_a_causal_lm_scores_the_text_itself(induction):
    handle, cap = induction
    suite = la.live_suite(handle, cap)
    queries = suite.items[0].metadata["queries"]
    assert suite.items[0].ids == CLEAN and [q["answer"] for q in queries] == CLEAN[1:]
    result = la.score(handle, cap, "ablation-sweep")
    assert result.metrics() == ["next_token_accuracy"] and result.grid().shape == (2, 4)
    with pytest.raises(InputError, match="not offered"):
        la.score(handle, cap, "hrv")


def test_score_figure_draws_the_grid_and_outlines_the_selected_head(cap, minilm):
    result = la.score(minilm, cap, "head-stats")
    fig = score_figure(cap, result, "entropy", [2, 5])
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), result.grid("entropy"), atol=1e-6)
    assert fig.layout.meta == {"capture": cap.key} and len(fig.layout.shapes) == 1
    assert (fig.layout.shapes[0].x0, fig.layout.shapes[0].y0) == (4.5, 1.5)
    assert list(fig.data[0].customdata[2][5]) == [2, 5]  # what a click sends back


def test_attribution_flow_and_relevance_equal_the_library(cap, minilm, induction):
    flow = la.attribute(minilm, cap, "flow")
    full = np.asarray(attention_flow(attnscope.capture(minilm, TEXT)))  # [layer, batch, query, key]: every source
    np.testing.assert_allclose(flow.values, full[-1, 0].mean(0), atol=1e-9)
    assert "mean over tokens" in flow.title and len(flow.table.df) == cap.n_tokens
    rel = la.attribute(minilm, cap, "relevance")
    np.testing.assert_allclose(rel.values, relevance(minilm, TEXT).row.double().numpy(), atol=1e-6)
    handle, icap = induction
    last = la.attribute(handle, icap, "flow")
    trace = attnscope.capture(handle, torch.tensor([CLEAN]))
    np.testing.assert_allclose(last.values, np.asarray(attention_flow(trace))[-1, 0, -1], atol=1e-9)
    from attnscope.dashboards.live_views import attribution_figure

    fig = attribution_figure(icap, "flow")
    assert "flow" in fig.layout.title.text and fig.layout.meta == {"capture": icap.key}


def _logit_diff(module, ids, answer, foil):
    with torch.no_grad():
        logits = module(input_ids=torch.tensor([ids])).logits[0, -1]
    return float(logits[answer] - logits[foil])


def test_exact_patch_grid_equals_activation_patching_and_a_manual_patch(induction):
    handle, cap = induction
    module = handle.module
    with torch.no_grad():
        answer = int(module(input_ids=torch.tensor([CLEAN])).logits[0, -1].argmax())
        foil = int(module(input_ids=torch.tensor([CORRUPT])).logits[0, -1].argmax())
    assert answer == 44 and foil != answer
    result = la.patch(handle, cap, " ".join(map(str, CORRUPT)), method="exact")
    pairs = PatchPairs.from_ids([CLEAN], [CORRUPT], answers=[[answer]], wrong=[[foil]])
    direct = head_values(activation_patching(handle, pairs, "logit_diff"), "logit_diff").to_numpy()
    np.testing.assert_allclose(result.grid(), direct, atol=1e-6)
    # by hand: L1H2's slice of c_proj's input taken from the corrupted run, in the clean run
    proj = module.transformer.h[1].attn.c_proj
    d = module.config.n_embd // module.config.n_head
    store = {}
    hook = proj.register_forward_pre_hook(lambda m, args: store.__setitem__("z", args[0].clone()))
    _logit_diff(module, CORRUPT, answer, foil)
    hook.remove()

    def swap(m, args):
        z = args[0].clone()
        z[..., 2 * d:3 * d] = store["z"][..., 2 * d:3 * d]
        return (z,)
    hook = proj.register_forward_pre_hook(swap)
    patched = _logit_diff(module, CLEAN, answer, foil)
    hook.remove()
    assert result.grid()[1, 2] == pytest.approx(patched - _logit_diff(module, CLEAN, answer, foil), abs=1e-4)
    assert result.grid()[1, 2] < -5  # the induction head carries the answer
    fig = patch_figure(cap, result, [1, 2])
    assert "exact" in fig.layout.title.text and "estimate" not in fig.layout.title.text
    assert fig.data[0].zmid == 0 and len(fig.layout.shapes) == 1


def test_atp_grids_are_titled_estimates(induction):
    handle, cap = induction
    for method in ("atp", "atp*"):
        result = la.patch(handle, cap, " ".join(map(str, CORRUPT)), "#44", "#4", method)
        assert "estimate" in result.title and result.grid().shape == (2, 4)
        assert bool(result.table.df["is_estimate"].all())


def test_patch_errors_are_one_line_input_errors(cap, minilm, induction):
    handle, icap = induction
    with pytest.raises(InputError, match="needs a causal LM"):
        la.patch(minilm, cap, TEXT)
    with pytest.raises(InputError, match="as many tokens"):
        la.patch(handle, icap, "5 9 17")
    with pytest.raises(InputError, match="same token"):
        la.patch(handle, icap, " ".join(map(str, CORRUPT)), "#44", "44")
    with pytest.raises(InputError, match="outside the vocabulary"):
        la.patch(handle, icap, " ".join(map(str, CORRUPT)), "#999")
    with pytest.raises(InputError, match="one token each"):
        la.parse_token(" the cat", minilm.tokenizer, 30522)
    assert la.parse_token(" cat", minilm.tokenizer, 30522) == minilm.tokenizer(" cat", add_special_tokens=False)[
        "input_ids"][0]


def test_save_writes_result_tables_inside_the_results_folder(tmp_path, cap, minilm):
    root = ResultsRoot(tmp_path)
    result = la.score(minilm, cap, "head-stats")
    paths = [la.save_analysis(result, cap, root) for _ in range(2)]  # twice within a second: two names
    assert len(set(paths)) == 2 and all(p.startswith("live/") and p.endswith(".parquet") for p in paths)
    table = attnscope.ResultTable.load(tmp_path / paths[0])
    np.testing.assert_allclose(head_values(table, "sink_mass").to_numpy(), result.grid("sink_mass"))
    assert table.provenance["live_analysis"] == "score" and table.provenance["name"] == "head-stats"
    assert set(paths) <= {f for run in root.runs() for f in run.files()}  # the results tab lists them
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporary file left


def test_long_and_media_captures_are_refused_with_one_line(cap, minilm):
    import dataclasses
    from types import SimpleNamespace

    import transformers

    from attnscope.dashboards.live_analysis_callbacks import grid_cell
    from attnscope.dashboards.live_messages import error_line
    from attnscope.dashboards.live_state import DENSE_LIMIT

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    tiny = LiveSession(transformers.LlamaForCausalLM(cfg).eval(), "tiny")
    long = tiny.capture("tiny", " ".join(str(i % 64) for i in range(DENSE_LIMIT + 8)), "ids")
    with pytest.raises(InputError, match="needs the dense capture") as info:
        la.score(tiny.model("tiny"), long, "head-stats")
    assert "\n" not in error_line(info.value) and error_line(info.value).startswith("error: scoring needs")
    media = dataclasses.replace(cap)
    media.media = SimpleNamespace(kind="vlm")
    with pytest.raises(InputError, match="works on text captures"):
        la.attribute(minilm, media, "flow")
    assert grid_cell({"points": [{"x": 5, "y": 2, "z": 0.1}]}) == (2, 5)  # what Dash sends for a heatmap click
    assert grid_cell({"points": [{"x": 5, "y": 2, "customdata": [3, 4]}]}) == (3, 4)
