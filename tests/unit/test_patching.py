"""Activation patching, attribution patching (AtP, AtP*), verified top-k and steering, against independent oracles:
a loop of plain forward pre-hooks on the output projections, gradients written out with autograd here, a planted
saturated head, and the steering vector added by hand."""

import json

import pytest
import torch
import transformers

from attnscope.circuits.gradient_patching import attribution_patching
from attnscope.circuits.patch_pairs import PatchPairs
from attnscope.circuits.patching import activation_patching
from attnscope.circuits.verified_patching import clopper_pearson_upper, verified_top_k
from attnscope.cli import main
from attnscope.probes.heads import HeadSet
from attnscope.probes.interventions import InterventionPlan, apply_plan

B, T = 4, 8


def _model(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel(cfg).eval()
    common = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common)).eval()
    return transformers.BertModel(transformers.BertConfig(**common)).eval()


def _projection(model, layer: int):
    if isinstance(model, transformers.GPT2LMHeadModel):
        return model.transformer.h[layer].attn.c_proj
    if isinstance(model, transformers.LlamaForCausalLM):
        return model.model.layers[layer].self_attn.o_proj
    return model.encoder.layer[layer].attention.output.dense


def _pairs() -> PatchPairs:
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(2, 32, (B, T), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 5) % 30 + 2
    corrupt[:, 5] = (clean[:, 5] + 11) % 30 + 2
    return PatchPairs.from_ids(clean.tolist(), corrupt.tolist(), answers=[[1]] * B, wrong=[[0]] * B)


DIRECTION = torch.randn(32, generator=torch.Generator().manual_seed(3))


def cls_score(output, batch):  # encoder metric: [CLS] hidden state on a fixed direction, one value per pair
    return output.last_hidden_state[:, 0] @ DIRECTION


def _metric(model, output) -> torch.Tensor:
    if isinstance(model, transformers.BertModel):
        return cls_score(output, None).mean()
    logits = output.logits[:, -1]
    return (logits[:, 1] - logits[:, 0]).mean()


def _heads_view(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], 4, 8)


def _record(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    seen, handles = {}, []
    for layer in range(2):
        handles.append(_projection(model, layer).register_forward_pre_hook(
            lambda m, a, _l=layer: seen.__setitem__(_l, _heads_view(a[0]).clone())))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


def _reference(model, base: torch.Tensor, source: dict, layer: int, heads: list[int], position=None) -> float:
    """metric(base with the heads' outputs taken from ``source``) - metric(base), with a plain pre-hook."""
    def hook(module, args):
        x = _heads_view(args[0]).clone()
        where = slice(None) if position is None else position
        x[:, where, heads] = source[layer][:, where, heads]
        return (x.reshape(args[0].shape),)
    with torch.no_grad():
        baseline = _metric(model, model(input_ids=base))
        handle = _projection(model, layer).register_forward_pre_hook(hook)
        try:
            patched = _metric(model, model(input_ids=base))
        finally:
            handle.remove()
    return float(patched - baseline)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_exact_patching_equals_a_loop_of_plain_hooks(family, direction):
    model, pairs = _model(family), _pairs()
    metric = cls_score if family == "bert" else "logit_diff"
    clean, corrupt = torch.tensor(pairs.clean), torch.tensor(pairs.corrupt)
    base, source = (clean, corrupt) if direction == "noise" else (corrupt, clean)
    recorded = _record(model, source)
    table = activation_patching(model, pairs, metric, direction=direction, batch_size=3)  # 2 batches, uneven
    got = {(r.layer, r.head): r.effect for r in table.df.itertuples()}
    want = {(l, h): _reference(model, base, recorded, l, [h]) for l in range(2) for h in range(4)}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=2e-6), key
    assert not table.df["is_estimate"].any() and set(table.df["method"]) == {"exact"}
    span = table.provenance["clean_metric"] - table.provenance["corrupt_metric"]
    assert table.df["normalized_effect"].to_numpy() == pytest.approx(table.df["effect"].to_numpy() / span)
    if family == "llama":  # per KV head: both query heads of the group patched together
        kv = activation_patching(model, pairs, metric, direction=direction, granularity="kv_head")
        for r in kv.df.itertuples():
            assert r.effect == pytest.approx(_reference(model, base, recorded, r.layer, [2 * r.head, 2 * r.head + 1]),
                                             abs=2e-6)
    if family == "gpt2":  # per head and position
        per = activation_patching(model, pairs, metric, direction=direction, granularity="head_position",
                                  heads=HeadSet([(0, 1), (1, 3)]))
        assert len(per) == 2 * T
        for r in per.df.itertuples():
            assert r.effect == pytest.approx(_reference(model, base, recorded, r.layer, [r.head], r.position),
                                             abs=2e-6)


def _hand_atp(model, pairs, drop_block=None):
    """Per pair and head: (z_corrupt - z_clean) . d m_pair / dz at the clean run, with autograd written here
    (``drop_block``: that block's residual contribution detached, GradDrop by hand)."""
    clean, corrupt = torch.tensor(pairs.clean), torch.tensor(pairs.corrupt)
    z_clean, z_corrupt = _record(model, clean), _record(model, corrupt)
    leaves = {l: torch.zeros(B, T, 4, 8, requires_grad=True) for l in range(2)}
    handles = [_projection(model, l).register_forward_pre_hook(
        lambda m, a, _l=l: ((_heads_view(a[0]) + leaves[_l]).reshape(a[0].shape),)) for l in range(2)]
    if drop_block is not None:
        block, seen = model.transformer.h[drop_block], {}
        handles.append(block.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("x", a[0] if a else
                                                                                          k["hidden_states"]),
                                                       with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, out: seen["x"] + (out - seen["x"]).detach()))
    logits = model(input_ids=clean).logits[:, -1]
    for h in handles:
        h.remove()
    per_pair = logits[:, 1] - logits[:, 0]
    grads = torch.autograd.grad(per_pair.sum(), [leaves[0], leaves[1]], allow_unused=True)
    return {l: ((z_corrupt[l] - z_clean[l]) * (g if g is not None else 0)).sum((1, 3)) for l, g in zip(range(2), grads)}


def test_atp_equals_gradient_times_difference_by_hand_and_gqa_sums_query_heads():
    model, pairs = _model("gpt2"), _pairs()
    hand = _hand_atp(model, pairs)
    table = attribution_patching(model, pairs, "logit_diff", method="atp", batch_size=3)
    for r in table.df.itertuples():
        assert r.value == pytest.approx(float(hand[r.layer][:, r.head].mean()), abs=1e-6)
    assert table.df["is_estimate"].all() and set(table.df["method"]) == {"atp"}
    step = 1e-3  # and AtP is the derivative of the exact patch along the straight line (central differences)
    z = _record(model, torch.tensor(pairs.corrupt))
    z0 = _record(model, torch.tensor(pairs.clean))
    mixed = {l: z0[l] + step * (z[l] - z0[l]) for l in z}
    back = {l: z0[l] - step * (z[l] - z0[l]) for l in z}
    fd = (_reference(model, torch.tensor(pairs.clean), mixed, 1, [2])
          - _reference(model, torch.tensor(pairs.clean), back, 1, [2])) / (2 * step)
    assert fd == pytest.approx(float(table.df.query("layer == 1 and head == 2")["value"].iloc[0]), rel=2e-2, abs=1e-5)
    llama = _model("llama")
    per_head = attribution_patching(llama, pairs, "logit_diff", method="atp").df
    per_kv = attribution_patching(llama, pairs, "logit_diff", method="atp", granularity="kv_head").df
    for r in per_kv.itertuples():
        group = per_head[(per_head["layer"] == r.layer) & per_head["head"].isin([2 * r.head, 2 * r.head + 1])]
        assert r.value == pytest.approx(float(group["value"].sum()), abs=1e-7)


def test_atp_star_graddrop_rule_by_hand():
    """Two layers: layer-0 heads get mean_pairs |I with block 1 dropped| (1/(L-1) = 1, their own layer's term is 0);
    layer-1 heads mean_pairs |I| (dropping block 0, upstream of them, changes nothing)."""
    model, pairs = _model("gpt2"), _pairs()
    plain, dropped = _hand_atp(model, pairs), _hand_atp(model, pairs, drop_block=1)
    table = attribution_patching(model, pairs, "logit_diff", method="atp*", batch_size=3)
    for r in table.df.itertuples():
        want = (dropped[0][:, r.head] if r.layer == 0 else plain[1][:, r.head]).abs().mean()
        assert r.value == pytest.approx(float(want), abs=1e-6), (r.layer, r.head)
        assert r.signed_estimate == pytest.approx(float(plain[r.layer][:, r.head].mean()), abs=1e-6)


def _deep(family: str, n_layers: int = 4):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=n_layers, n_head=4)
        model = transformers.GPT2LMHeadModel(cfg).eval()
        return model, model.transformer.h, [b.attn.c_proj for b in model.transformer.h]
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, model.model.layers, [b.self_attn.o_proj for b in model.model.layers]


def _hand_graddrop(model, blocks, projections, pairs) -> torch.Tensor:
    """``[layer, head]`` AtP* by hand: per dropped block ``d`` the forward is rerun with that block's residual
    contribution detached (``x + (f(x) - x).detach()``), autograd gives each head's ``I_d``, and
    ``value = mean_pairs 1/(L-1) sum_{d != layer} |I_d|``."""
    n = len(blocks)
    clean, corrupt = torch.tensor(pairs.clean), torch.tensor(pairs.corrupt)

    def record(ids):
        seen = {}
        hs = [p.register_forward_pre_hook(lambda m, a, _l=l: seen.__setitem__(_l, _heads_view(a[0]).clone()))
              for l, p in enumerate(projections)]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hs:
            h.remove()
        return seen

    z_clean, z_corrupt = record(clean), record(corrupt)

    def per_pair(drop):
        leaves = {l: torch.zeros(B, T, 4, 8, requires_grad=True) for l in range(n)}
        hs = [p.register_forward_pre_hook(lambda m, a, _l=l: ((_heads_view(a[0]) + leaves[_l]).reshape(a[0].shape),))
              for l, p in enumerate(projections)]
        if drop is not None:
            seen = {}
            hs.append(blocks[drop].register_forward_pre_hook(
                lambda m, a, k: seen.__setitem__("x", a[0] if a else k["hidden_states"]), with_kwargs=True))

            def detach(m, a, out):
                y = out if torch.is_tensor(out) else out[0]
                y = seen["x"] + (y - seen["x"]).detach()
                return y if torch.is_tensor(out) else (y,) + tuple(out[1:])
            hs.append(blocks[drop].register_forward_hook(detach))
        logits = model(input_ids=clean).logits[:, -1]
        for h in hs:
            h.remove()
        grads = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), [leaves[l] for l in range(n)],
                                    allow_unused=True)
        return torch.stack([((z_corrupt[l] - z_clean[l]) * (g if g is not None else 0)).sum((1, 3))
                            for l, g in enumerate(grads)])  # [layer, pair, head]

    plain = per_pair(None)
    dropped = {d: per_pair(d) for d in range(1, n)}
    out = torch.zeros(n, 4, dtype=torch.float64)
    for layer in range(n):
        terms = [dropped[d][layer] if d > layer else plain[layer] for d in range(n) if d != layer]
        out[layer] = torch.stack(terms).abs().mean(0).mean(0).double()
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_atp_star_graddrop_on_four_layers_equals_detached_blocks_by_hand(family):
    """Each dropped backward starts at its block's output (layers above it are shared with the full backward):
    the values must equal reruns with one block's contribution detached, for every block."""
    model, blocks, projections = _deep(family)
    pairs = _pairs()
    want = _hand_graddrop(model, blocks, projections, pairs)
    table = attribution_patching(model, pairs, "logit_diff", method="atp*", batch_size=3)
    assert table.provenance["graddrop"] is True
    for r in table.df.itertuples():
        assert r.value == pytest.approx(float(want[r.layer, r.head]), rel=1e-5, abs=1e-7), (r.layer, r.head)
    assert float(want[:-1].abs().sum()) > 0  # the dropped terms are not all zero


def planted_saturated_model(marker: int = 3, stronger: int = 4):
    """2-layer GPT-2, layer 0 silenced; head L1H0 has a constant query and keys that score ``marker`` 32 and
    ``stronger`` 64 (others 0): its attention is saturated on whichever is present."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=12, n_positions=8, n_embd=16, n_layer=2, n_head=2,
                                  scale_attn_weights=False, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
        block0, block1 = model.transformer.h
        for p in (block0.attn.c_proj.weight, block0.attn.c_proj.bias, block0.mlp.c_proj.weight,
                  block0.mlp.c_proj.bias, block1.mlp.c_proj.weight, block1.mlp.c_proj.bias):
            p.zero_()
        normed = torch.nn.functional.layer_norm(model.transformer.wte.weight, (16,))  # what ln_1 gives at init
        weight, bias = block1.attn.c_attn.weight, block1.attn.c_attn.bias  # [16, q | k | v], head 0 first
        weight[:, 0:8] = 0
        bias[0:8] = 0
        bias[0] = 2.0
        weight[:, 16:24] = 0
        bias[16:24] = 0
        target = torch.zeros(12)
        target[marker], target[stronger] = 16.0, 32.0
        weight[:, 16] = torch.linalg.lstsq(normed, target[:, None]).solution[:, 0]
    return model


def test_saturated_head_is_missed_by_atp_through_qk_and_found_by_atp_star():
    from attnscope.circuits.gradient_patching import attention_probs, record_qkv
    from attnscope.probes.head_slices import output_projections

    model = planted_saturated_model()
    clean, corrupt = [[5, 6, 3, 7, 8, 9, 10, 11]], [[5, 6, 3, 7, 8, 4, 10, 11]]
    for ids, at in ((clean, 2), (corrupt, 5)):  # the planted head is saturated in both runs, on different keys
        with torch.no_grad(), record_qkv(model, output_projections(model)) as qkv:
            model(torch.tensor(ids))
        r = qkv[1]
        probs = attention_probs(r["q"], r["k"], r["mask"], scaling=r["scaling"], is_causal=r["is_causal"])
        assert float(probs[0, 0, -1, at]) > 1 - 1e-9
    with torch.no_grad():
        change = model(torch.tensor(corrupt)).logits[0, -1] - model(torch.tensor(clean)).logits[0, -1]
    pairs = PatchPairs.from_ids(clean, corrupt, answers=[[int(change.argmin())]], wrong=[[int(change.argmax())]])
    exact = activation_patching(model, pairs).df.set_index(["layer", "head"])["effect"]
    est = {m: attribution_patching(model, pairs, method=m, components=True).df.set_index(["layer", "head"])
           for m in ("atp-qk", "atp*", "atp")}
    planted = (1, 0)
    assert abs(exact[planted]) > 0.03 and exact.abs().idxmax() == planted
    assert abs(est["atp-qk"].loc[planted, "value"]) < 1e-6 * abs(exact[planted])  # linearised softmax: ~0
    assert est["atp-qk"]["value"].abs().idxmax() != planted  # ... so plain AtP through q/k ranks it below L1H1
    assert est["atp*"]["value"].idxmax() == planted
    assert est["atp*"].loc[planted, "value"] == pytest.approx(abs(exact[planted]), rel=0.1)
    parts = est["atp"].loc[planted]  # the effect goes through where the head attends
    assert abs(parts["pattern_part"]) > 10 * abs(parts["value_part"])
    assert parts["pattern_part"] + parts["value_part"] == pytest.approx(parts["value"], rel=1e-4)


def test_steering_adds_the_vector_by_hand_and_serialises():
    model, ids = _model("gpt2"), torch.tensor(_pairs().clean)
    vector = torch.randn(8, generator=torch.Generator().manual_seed(5))
    plan = InterventionPlan(HeadSet([(1, 2)]), "steer", vectors={"L1H2": vector}, scale=2.0)
    assert InterventionPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan

    def by_hand(module, args):
        x = _heads_view(args[0]).clone()
        x[:, :, 2] += 2.0 * vector
        return (x.reshape(args[0].shape),)
    with torch.no_grad():
        with apply_plan(model, plan):
            steered = model(ids).logits
        handle = _projection(model, 1).register_forward_pre_hook(by_hand)
        want = model(ids).logits
        handle.remove()
        assert not torch.allclose(steered, model(ids).logits)
    torch.testing.assert_close(steered, want)
    llama = _model("llama")  # select="kv": the KV head's vector goes to both of its query heads
    kv_plan = InterventionPlan(HeadSet([(0, 1)]), "steer", select="kv", vectors={"L0H1": vector})
    group = InterventionPlan(HeadSet([(0, 2), (0, 3)]), "steer", vectors={"L0H2": vector, "L0H3": vector})
    with torch.no_grad():
        with apply_plan(llama, kv_plan):
            a = llama(ids).logits
        with apply_plan(llama, group):
            b = llama(ids).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(Exception, match="vector for every head"):
        InterventionPlan(HeadSet([(0, 0)]), "steer", vectors={})


def test_verified_top_k_labels_estimates_and_bounds_false_negatives():
    model, pairs = _model("gpt2"), _pairs()
    table = verified_top_k(model, pairs, "logit_diff", k=2, n_random=3, threshold=1e9)
    df = table.df
    heads = df[df["head"] >= 0]
    estimates, exact = heads[heads["method"] != "exact"], heads[heads["method"] == "exact"]
    assert len(estimates) == 8 and estimates["is_estimate"].all() and set(estimates["method"]) == {"atp*"}
    assert len(exact) == 5 and not exact["is_estimate"].any()
    assert list(estimates.sort_values("rank")["role"])[:2] == ["top", "top"]
    assert (estimates["role"] == "control").sum() == 3 and estimates["abs_estimate"].is_monotonic_decreasing
    full = activation_patching(model, pairs).df.set_index(["layer", "head"])["effect"]
    for r in exact.itertuples():
        assert r.value == pytest.approx(full[(r.layer, r.head)], abs=1e-7)
    bound = df[df["metric"] == "false_negative_rate_upper"].iloc[0]
    assert bound["is_estimate"] and bound["value"] == pytest.approx(1 - 0.05 ** (1 / 3))  # no control above 1e9
    assert bound["value"] == pytest.approx(clopper_pearson_upper(0, 3))
    assert clopper_pearson_upper(3, 3) == 1.0 and 0 < clopper_pearson_upper(1, 20) < 0.25


def test_cli_patch_on_a_pairs_file_and_out_checked_first(tmp_path, capsys):
    model, pairs = _model("gpt2"), _pairs()
    model.save_pretrained(tmp_path / "m")
    spec = [{"clean": c, "corrupt": x, "answers": [1], "wrong": [0]} for c, x in zip(pairs.clean, pairs.corrupt)]
    (tmp_path / "pairs.json").write_text(json.dumps(spec))
    out = tmp_path / "r" / "t.parquet"
    assert main(["patch", "--model", str(tmp_path / "m"), "--pairs", str(tmp_path / "pairs.json"), "--method", "atp",
                 "--out", str(out), "--no-progress"]) == 0
    from attnscope.results import ResultTable

    saved = ResultTable.load(out).df
    direct = attribution_patching(model, pairs, "logit_diff", method="atp").df
    assert saved["value"].to_numpy() == pytest.approx(direct["value"].to_numpy(), abs=1e-6)
    assert "atp, estimate" in capsys.readouterr().out
    for args, needle in ((["--model", "/no/such/model", "--suite", "ioi", "--out", str(tmp_path)], "directory"),
                         (["--model", str(tmp_path / "m"), "--suite", "needle", "--out", str(out)], "pairs")):
        assert main(["patch", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
