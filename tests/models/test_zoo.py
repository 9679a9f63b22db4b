"""The shipped zoo checkpoints: they load with plain transformers, reach their card's held-out accuracy on items
drawn with a seed neither training nor the card used, their named heads show the named attention patterns, and
the ablation claims hold (key heads ablated -> the task collapses; as many random other heads -> it does not).

Metrics and patterns are recomputed here from the suites' ground-truth metadata, independently of the zoo's own
analysis code. No retraining.
"""

import json

import numpy as np
import pytest
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from attnscope import zoo
from attnscope.datasets import agreement, associative_recall, bigram_backcopy, induction
from attnscope.errors import HeadSpecError, ModelNotFoundError
from attnscope.probes.ablation import zero_ablate_heads

SEED = 97_531  # not a training seed (those are >= 2**31) nor a card seed (1_000_00x)
MARGIN = 0.04
N_RANDOM = 6
NAMES = ["induction-2l", "recall-llama", "sink-lm", "agreement-enc"]


def _heads(names):
    return [(int(n[1:].split("H")[0]), int(n.split("H")[1])) for n in names]


@pytest.fixture(scope="module", params=NAMES)
def organism(request):
    name = request.param
    path = zoo.checkpoint_path(name)
    card = json.loads((path / "card.json").read_text())
    cls = getattr(transformers, card["architecture"]["class"])
    model = cls.from_pretrained(path, attn_implementation="eager").eval()
    params = {k: v for k, v in card["data"]["params"].items() if k != "n_items"}
    return name, model, card, params


# ---- task metrics and patterns, per organism (oracles from the suite metadata) ---------------------------------

def _attn(model, ids, mask=None):
    """Eager attention as ``[batch, query, key, layer, head]`` (so fancy indexing keeps layer x head last)."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    return torch.stack(out.attentions).permute(1, 3, 4, 0, 2)


class Induction:
    def __init__(self, params):
        suite = induction(96, seed=SEED, **params)
        self.suite, self.ids = suite, torch.tensor([it.ids for it in suite])
        self.target = torch.zeros_like(self.ids, dtype=torch.bool)
        for row, it in enumerate(suite):
            start, end = it.metadata["repeat_span"]
            self.target[row, start + 1:end] = True  # predictable: the previous token was seen before

    def metric(self, model):
        with torch.no_grad():
            pred = model(self.ids).logits.argmax(-1)[:, :-1]
        return float((pred == self.ids[:, 1:])[self.target[:, 1:]].float().mean())

    def patterns(self, model):
        a = _attn(model, self.ids)
        q = torch.arange(1, self.ids.shape[1])
        prev = a[:, q, q - 1].mean(dim=(0, 1))
        mass, count = 0.0, 0
        for b, it in enumerate(self.suite):
            start, end = it.metadata["repeat_span"]
            for t in range(start, end):  # keys right after an earlier occurrence of token t
                keys = [s for s in range(1, t + 1) if it.ids[s - 1] == it.ids[t]]
                mass = mass + a[b, t, keys].sum(0)
                count += 1
        return {"previous_token": (prev, 0.4), "induction": (mass / count, 0.8)}


class Recall:
    def __init__(self, params):
        self.suite = associative_recall(96, seed=SEED, **params)
        seqs = [it.ids + it.answer_ids for it in self.suite]
        batch = next(type(self.suite)("full", [type(self.suite[0])(ids=s) for s in seqs]).batches(len(seqs)))
        self.ids, self.mask = batch.input_ids, batch.attention_mask
        self.queries = [(b, q) for b, it in enumerate(self.suite) for q in it.metadata["queries"]]

    def metric(self, model):
        with torch.no_grad():
            pred = model(input_ids=self.ids, attention_mask=self.mask).logits.argmax(-1)
        return float(np.mean([int(pred[b, q["position"]]) == q["answer"] for b, q in self.queries]))

    def patterns(self, model):
        a = _attn(model, self.ids, self.mask)
        hits = torch.stack([a[b, q["position"]].argmax(0) == q["value_position"] for b, q in self.queries])
        binds = [a[b, q["value_position"], q["key_position"]] for b, q in self.queries]
        return {"retrieval": (hits.float().mean(0), 0.9), "value_to_key": (torch.stack(binds).mean(0), 0.6)}


class Backcopy:
    def __init__(self, params):
        self.suite = bigram_backcopy(64, seed=SEED, **params)
        self.ids = torch.tensor([it.ids for it in self.suite])
        self.trig = torch.zeros_like(self.ids, dtype=torch.bool)
        for row, it in enumerate(self.suite):
            self.trig[row, it.metadata["trigger_positions"]] = True

    def metric(self, model):
        with torch.no_grad():
            pred = model(self.ids).logits.argmax(-1)[:, :-1]
        return float((pred == self.ids[:, 1:])[self.trig[:, :-1]].float().mean())

    def patterns(self, model):
        a = _attn(model, self.ids)
        non_trigger = ~self.trig.clone()
        non_trigger[:, 0] = False
        sink = a[:, :, 0][non_trigger].mean(0)  # [layer, head]: mass on BOS from non-trigger queries
        t = self.trig.nonzero()
        copy = a[t[:, 0], t[:, 1], t[:, 1] - 1].mean(0)
        return {"sink": (sink, 0.3), "active_dormant_backcopy": (copy, 0.6)}


class Agreement:
    def __init__(self, params):
        self.suite = agreement(256, seed=SEED, **params)
        batch = next(self.suite.batches(len(self.suite), pad_id=params["pad_id"]))
        self.ids, self.mask = batch.input_ids, batch.attention_mask
        self.labels = torch.tensor([it.label for it in self.suite])
        self.marker = torch.tensor([it.metadata["marker_position"] for it in self.suite])

    def metric(self, model):
        with torch.no_grad():
            return float((model(input_ids=self.ids, attention_mask=self.mask).logits.argmax(-1) == self.labels)
                         .float().mean())

    def patterns(self, model):
        a = _attn(model, self.ids, self.mask)
        b, m = torch.arange(len(self.suite)), self.marker
        evidence = (a[b, 0, m] + a[b, 0, m + 1]).mean(0)
        bind = torch.maximum(a[b, m + 1, m].mean(0), a[b, m, m + 1].mean(0))
        return {"cls_readout": (evidence, 0.4), "marker_binding": (bind, 0.6)}


TASKS = {"induction-2l": Induction, "recall-llama": Recall, "sink-lm": Backcopy, "agreement-enc": Agreement}


@pytest.fixture(scope="module")
def task(organism):
    name, model, card, params = organism
    return TASKS[name](params)


# ---- the API ---------------------------------------------------------------------------------------------------

def test_list_organisms_and_paths():
    listed = zoo.list_organisms()
    # the multimodal shapes organisms have their own checks in test_shapes_zoo.py
    assert [o["name"] for o in listed] == NAMES + ["shapes-classifier", "shapes-vlm", "shapes-diffusion"]
    for entry in listed[:len(NAMES)]:
        assert entry["trained"] and entry["accuracy"] > 0.9 and entry["ground_truth_heads"]
        path = zoo.checkpoint_path(entry["name"])
        assert (path / "config.json").is_file() and (path / "MODEL_CARD.md").is_file()
        assert 50_000 < (path / "model.safetensors").stat().st_size < 2_500_000
    with pytest.raises(ModelNotFoundError) as err:
        zoo.checkpoint_path("no-such-organism")
    assert "induction-2l" in str(err.value) and "zoo list" in str(err.value)


def test_card_fields(organism):
    name, model, card, params = organism
    assert card["name"] == name and card == zoo.load_card(name)
    for key in ("task", "architecture", "seed", "training", "evaluation", "ground_truth_heads", "head_scores",
                "ablation", "data"):
        assert key in card
    assert card["training"]["steps"] > 0 and card["training"]["time_s"] > 0
    assert type(model).__name__ == card["architecture"]["class"]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == card["architecture"]["parameters"]


# ---- behaviour -------------------------------------------------------------------------------------------------

def test_held_out_accuracy_matches_the_card(organism, task):
    name, model, card, _ = organism
    assert task.metric(model) >= card["evaluation"]["value"] - MARGIN


def test_named_heads_show_their_patterns(organism, task):
    name, model, card, _ = organism
    patterns = task.patterns(model)
    for role, heads in card["ground_truth_heads"].items():
        scores, threshold = patterns[role]
        assert heads, role
        for layer, head in _heads(heads):
            assert scores[layer, head] > threshold, (role, layer, head, float(scores[layer, head]))
        named = set(_heads(heads))
        others = [float(scores[l, h]) for l in range(scores.shape[0]) for h in range(scores.shape[1])
                  if (l, h) not in named]
        if others:  # the named heads stand out from the rest
            assert min(float(scores[l, h]) for l, h in named) > max(others), role


def test_ablating_the_key_heads_destroys_the_task_and_random_heads_do_not(organism, task):
    name, model, card, _ = organism
    study = card["ablation"]["key_heads"]
    key = _heads(study["key_heads"])
    clean = task.metric(model)
    with zero_ablate_heads(model, key):
        ablated = task.metric(model)
    chance = study["chance"]
    assert ablated < chance + 0.25 * (clean - chance), (name, clean, ablated)
    heads = [(l, h) for l in range(model.config.num_hidden_layers) for h in range(model.config.num_attention_heads)]
    others = [h for h in heads if h not in key]
    if len(others) < len(key):  # no head lasso (agreement-enc): then the key heads alone must carry the task
        with zero_ablate_heads(model, others):
            alone = task.metric(model)
        assert alone > chance + 0.8 * (clean - chance), (name, clean, alone)
        return
    rng = np.random.default_rng(SEED)
    kept = []
    for _ in range(N_RANDOM):
        pick = [others[i] for i in rng.choice(len(others), size=len(key), replace=False)]
        with zero_ablate_heads(model, pick):
            kept.append(task.metric(model))
    assert np.mean(kept) > chance + 0.8 * (clean - chance), (name, clean, kept)


# ---- the ablation context manager --------------------------------------------------------------------------------

def _tiny(family):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=16, vocab_size=32, n_positions=16)).eval()
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=4)
    return transformers.BertForSequenceClassification(cfg).eval()


def _projection(model, layer):
    if hasattr(model, "transformer"):
        return model.transformer.h[layer].attn.c_proj, False
    if hasattr(model, "bert"):
        return model.bert.encoder.layer[layer].attention.output.dense, True
    return model.model.layers[layer].self_attn.o_proj, True


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_zero_ablation_equals_zeroing_the_projection_weight_slice(family):
    model = _tiny(family)
    x = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad(), zero_ablate_heads(model, {1: [2], 0: [0, 3]}):
        hooked = model(x).logits
    d_head = 4
    with torch.no_grad():
        for layer, heads in {1: [2], 0: [0, 3]}.items():
            proj, linear = _projection(model, layer)
            for h in heads:
                cols = slice(h * d_head, (h + 1) * d_head)
                if linear:
                    proj.weight[:, cols] = 0  # nn.Linear: [out, in]
                else:
                    proj.weight[cols, :] = 0  # GPT-2 Conv1D: [in, out]
        surgery = model(x).logits
    torch.testing.assert_close(hooked, surgery)


def test_ablation_hooks_are_removed_even_on_error():
    model = _tiny("gpt2")
    x = torch.tensor([[1, 2, 3]])
    before = model(x).logits
    with pytest.raises(RuntimeError), zero_ablate_heads(model, [(0, 1)]):
        raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(x).logits, before)
    with pytest.raises(HeadSpecError):
        with zero_ablate_heads(model, {0: [4]}):
            pass
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["induction-2l", "recall-llama", "sink-lm", "agreement-enc"])
def test_every_organism_loads_and_passes_validate(name):
    import attnscope
    from attnscope.probes import validate

    report = validate(attnscope.load(f"zoo:{name}"))
    assert report.ok, str(report)
    assert report.output_bit_identical
