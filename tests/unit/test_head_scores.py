"""Head scores over suites: detectors, sinks, retrieval heads, StreamingLLM windows.

Analytic cases use a GPT-2 whose queries and keys are planted by a hook on ``c_attn`` (d_head 64, scale 1/8, so a
planted logit gap of 30^2/8 makes attention one-hot); independent references are HF eager ``output_attentions`` and
TransformerLens' own head-detector functions.
"""

import math

import numpy as np
import pytest
import torch
import transformers
from tiny_models import tiny_text_model

import attnscope
from attnscope.circuits import detectors, retrieval_heads as retrieval, attention_sinks as sinks, sink_window_perplexity as streaming_llm
from attnscope.datasets import PromptItem, PromptSuite, induction, needle_tokens
from attnscope.errors import InputError

BIG = 30.0
E, N_HEADS, D = 128, 2, 64


# ---- a GPT-2 with planted queries and keys ------------------------------------------------------------------------

def planted_gpt2(plant, *, vocab=32, attn="sdpa", forced=None):
    """1-layer, 2-head GPT-2; ``plant[h](seq, positions) -> (q [t, D], k [t, D])`` overrides head h's queries and
    keys; ``forced(seq, n_prompt) -> token`` overrides the next-token logits of the last row."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=96, n_embd=E, n_layer=1, n_head=N_HEADS)
    cfg._attn_implementation = attn
    model = transformers.GPT2LMHeadModel(cfg).eval()
    state = {"seqs": [], "n_prompt": 0}

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        if past is None or past.get_seq_length() == 0:
            state["seqs"], state["n_prompt"] = ids.tolist(), ids.shape[1]
        else:
            state["seqs"] = [s + new for s, new in zip(state["seqs"], ids.tolist())]

    def qk(module, args, out):
        t = out.shape[1]
        for b, seq in enumerate(state["seqs"]):
            positions = list(range(len(seq) - t, len(seq)))
            for h, fn in plant.items():
                q, k = fn(seq, positions)
                out[b, :, h * D:(h + 1) * D] = q
                out[b, :, E + h * D:E + (h + 1) * D] = k
        return out

    def logits(module, args, out):
        if forced is not None:
            for b, seq in enumerate(state["seqs"]):
                out[b, -1] = -BIG
                out[b, -1, forced(seq, state["n_prompt"])] = BIG
        return out

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.transformer.h[0].attn.c_attn.register_forward_hook(qk)
    model.lm_head.register_forward_hook(logits)
    return model


def onehot(rows):
    out = torch.zeros(len(rows), D)
    for i, r in enumerate(rows):
        if r is not None:
            out[i, r] = BIG
    return out


def prev_token_head(seq, positions):
    return onehot([max(p - 1, 0) for p in positions]), onehot([p for p in positions])


def sink_head(seq, positions):
    return onehot([0 for _ in positions]), onehot([0 if p == 0 else None for p in positions])


def uniform_head(seq, positions):
    return torch.zeros(len(positions), D), torch.zeros(len(positions), D)


def induction_head(seq, positions):
    return onehot([seq[p] for p in positions]), onehot([seq[p - 1] if p > 0 else None for p in positions])


def token_suite(n_items=3, seq_len=20, vocab=32, seed=0):
    rng = np.random.default_rng(seed)
    return PromptSuite("random", [PromptItem(ids=rng.integers(0, vocab, seq_len).tolist()) for _ in range(n_items)])


# ---- detectors --------------------------------------------------------------------------------------------------

def test_template_scores_of_planted_and_uniform_patterns():
    n = 8
    P = detectors.previous_token_template(list(range(n)))
    planted = P.clone()
    planted[0, 0] = 1.0
    assert detectors.template_scores(planted[None], P).item() == 1.0
    assert detectors.template_scores(planted[None], P, normalise="tl").item() == pytest.approx((n - 1) / n)
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    expected = np.mean([1 / (t + 1) for t in range(1, n)])
    assert detectors.template_scores(uniform[None], P).item() == pytest.approx(expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_planted_heads_score_one_over_a_suite(attn):
    model = planted_gpt2({0: prev_token_head, 1: uniform_head}, attn=attn)
    table = detectors.previous_token_scores(model, token_suite(n_items=2, seq_len=16), progress=False)
    scores = {(r.layer, r.head): r.value for r in table.df.itertuples()}
    assert scores[(0, 0)] == pytest.approx(1.0, abs=1e-6)
    assert scores[(0, 1)] == pytest.approx(np.mean([1 / (t + 1) for t in range(1, 16)]), abs=1e-5)

    ind = induction(2, seq_len=24, vocab_size=32, seed=1)
    model = planted_gpt2({0: induction_head, 1: prev_token_head}, attn=attn)
    table = detectors.induction_scores(model, ind, progress=False)
    scores = {(r.layer, r.head): r.value for r in table.df.itertuples()}
    assert scores[(0, 0)] == pytest.approx(1.0, abs=1e-6) and scores[(0, 1)] < 0.2


@pytest.mark.parametrize("exclude_bos,exclude_current", [(False, False), (True, True)])
def test_tl_mode_matches_transformer_lens_detect_head(exclude_bos, exclude_current):
    from transformer_lens import head_detector as hd

    model = planted_gpt2({})  # random weights, no planted heads
    model.set_attn_implementation("eager")
    suite = induction(2, seq_len=16, vocab_size=32, seed=2)
    cases = [("previous_token", detectors.previous_token_scores, {}),
             ("duplicate_token", detectors.duplicate_token_scores, {}),
             ("induction", detectors.induction_scores, {"rows": "all"})]
    for name, fn, extra in cases:
        ref = torch.zeros(1, N_HEADS)
        for item in suite:
            tokens = torch.tensor([item.ids])
            pattern = getattr(hd, f"get_{name}_head_detection_pattern")(tokens)
            torch.testing.assert_close(pattern, getattr(detectors, f"{name}_template")(item.ids, item) if
                                       name != "induction" else detectors.induction_template(item.ids, rows="all"))
            with torch.no_grad():
                att = model(tokens, output_attentions=True).attentions[0][0]
            for h in range(N_HEADS):
                ref[0, h] += hd.compute_head_attention_similarity_score(
                    att[h], pattern, exclude_bos=exclude_bos, exclude_current_token=exclude_current,
                    error_measure="mul") / len(suite)
        model.set_attn_implementation("sdpa")
        table = fn(model, suite, normalise="tl", exclude_bos=exclude_bos, exclude_current_token=exclude_current,
                   progress=False, **extra)
        model.set_attn_implementation("eager")
        ours = torch.tensor(table.df.sort_values("head")["value"].to_numpy(), dtype=torch.float32)
        torch.testing.assert_close(ours, ref[0], atol=1e-5, rtol=1e-5)


def test_user_template_function_and_array():
    model = planted_gpt2({0: sink_head, 1: uniform_head})
    suite = token_suite(n_items=2, seq_len=10)
    template = np.zeros((10, 10))
    template[:, 0] = 1
    by_array = detectors.pattern_scores(model, suite, template=template, progress=False)
    by_function = detectors.pattern_scores(model, suite, progress=False,
                                           template=lambda ids, item: torch.as_tensor(template))
    assert by_array.df["value"].tolist() == pytest.approx(by_function.df["value"].tolist())
    assert by_array.df["value"].iloc[0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(InputError, match="template"):
        detectors.pattern_scores(model, suite, progress=False)


# ---- sinks -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_all_mass_on_token_zero_scores_one_and_uniform_gives_harmonic_mean(attn):
    model = planted_gpt2({0: sink_head, 1: uniform_head}, attn=attn)
    n = 12
    table = sinks.sink_scores(model, token_suite(n_items=2, seq_len=n), threshold=0.3, progress=False)
    df = table.df.set_index(["layer", "head", "metric"])["value"]
    assert df[(0, 0, "sink_score:pos0")] == pytest.approx(1.0, abs=1e-6)
    assert df[(0, 1, "sink_score:pos0")] == pytest.approx(np.mean([1 / (t + 1) for t in range(n)]), abs=1e-5)
    assert df[(0, 1, "sink_score:other")] == pytest.approx(np.mean([1 / (t + 1) for t in range(1, n)]), abs=1e-5)
    assert df[(-1, -1, "sink_fraction:pos0")] == pytest.approx(0.5)


def test_sink_scores_match_eager_patterns_with_gqa_and_special_tokens():
    model = tiny_text_model("llama")  # 4 query heads on 2 KV heads
    rng = np.random.default_rng(0)
    items = [PromptItem(ids=[1] + rng.integers(3, 64, 9).tolist() + [2] + rng.integers(3, 64, 4).tolist())
             for _ in range(2)]
    suite = PromptSuite("bos-sep", items, params={"bos_id": 1, "sep_id": 2})
    table = sinks.sink_scores(model, suite, positions=(0, 3), progress=False)
    df = table.df.set_index(["layer", "head", "metric"])["value"]
    model.set_attn_implementation("eager")
    for layer in range(2):
        ref = {"pos0": 0.0, "pos3": 0.0, "sep": 0.0}
        for item in items:
            with torch.no_grad():
                att = model(torch.tensor([item.ids]), output_attentions=True).attentions[layer][0]
            sep = item.ids.index(2)
            ref["pos0"] += att[:, 0:, 0].mean(-1) / len(items)
            ref["pos3"] += att[:, 3:, 3].mean(-1) / len(items)
            ref["sep"] += att[:, sep:, sep].mean(-1) / len(items)
        for label, values in ref.items():
            for h in range(4):
                assert df[(layer, h, f"sink_score:{label}")] == pytest.approx(float(values[h]), abs=1e-5)
        for h in range(4):  # the bos label is position 0
            assert df[(layer, h, "sink_score:bos")] == pytest.approx(df[(layer, h, "sink_score:pos0")])


def test_massive_activation_and_value_norms_of_a_planted_sink_token():
    model = tiny_text_model("llama")
    layer0 = model.model.layers[0]

    def massive(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden[:, 0, 5] = 5000.0
        return out
    def small_values(module, args, out):
        out[:, 0] = out[:, 0] * 0.01
        return out
    handles = [layer0.register_forward_hook(massive), layer0.self_attn.v_proj.register_forward_hook(small_values)]
    try:
        suite = token_suite(n_items=2, seq_len=10, vocab=64)
        table = sinks.massive_activations(model, suite, progress=False)
        values = sinks.value_norms(model, suite, progress=False)
    finally:
        for h in handles:
            h.remove()
    top = table.df[(table.df.layer == 0) & (table.df.metric == "top1_magnitude")].iloc[0]
    assert (top.dim, top.position, top.massive_fraction) == (5, 0, 1.0) and top.ratio_to_median > 1000
    sink_dim = table.df[(table.df.layer == 0) & (table.df.metric == "sink_dim1")].iloc[0]
    assert sink_dim.dim == 5
    ratios = values.df[(values.df.layer == 0) & (values.df.metric == "value_norm_ratio:pos0")]
    assert len(ratios) == 2 and (ratios["value"] < 0.05).all()  # one row per KV head
    assert (values.df[(values.df.layer == 1) & (values.df.metric == "value_norm_ratio:pos0")]["value"] > 0.05).all()


# ---- retrieval ---------------------------------------------------------------------------------------------------

def test_copy_counts_and_rouge():
    top = torch.tensor([[[[2, 1]]], [[[0, 3]]], [[[3, 3]]]])  # [step, layer, head, k]
    assert retrieval.copy_counts(top[..., :1], [2, 3, 9], [7, 1, 2, 3, 8], (1, 4)).tolist() == [[1]]
    assert retrieval.copy_counts(top, [2, 3, 9], [7, 1, 2, 3, 8], (1, 4)).tolist() == [[2]]  # one hit per step
    assert retrieval.rouge1_recall([1, 2, 2, 3], [2, 9, 1]) == 0.5
    assert retrieval.rouge1_recall_text(" 4821", "The code is 4821.") == 1.0
    from rouge_score import rouge_scorer

    ref, cand = "eat a sandwich and sit in Dolores Park", "Eating sandwiches in the park."
    expected = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(ref, cand)["rouge1"].recall
    assert retrieval.rouge1_recall_text(ref, cand) == pytest.approx(expected)
    assert retrieval.find_needle([5, 9, 1, 2, 3, 4, 7], [1, 2, 3, 4]) == (2, 6)
    assert retrieval.find_needle([5, 9, 1, 2, 8, 4, 7], [1, 2, 3, 4]) == (-1, -1)  # 3/4 <= 0.9


def _copy_model(suite):
    """Head 0 copies the answer token by token from the needle; head 1 attends to position 0."""
    item = suite[0]
    start = item.metadata["answer_span"][0]

    def copy_head(seq, positions):
        n_prompt = len(item.ids)
        q = [p - n_prompt + 1 if p >= n_prompt - 1 else None for p in positions]
        k = [p - start if start <= p < item.metadata["answer_span"][1] else None for p in positions]
        return onehot(q), onehot(k)

    def answer(seq, n_prompt):  # the prompt is the item's ids, however the caller splits prefill and decoding
        return seq[start + len(seq) - len(item.ids)]
    return planted_gpt2({0: copy_head, 1: sink_head}, vocab=64, forced=answer)


def test_planted_copy_head_scores_one_and_is_the_only_retrieval_head():
    suite = needle_tokens(1, seq_len=24, vocab_size=64, needle_len=5, cue_len=1, depth=0.5, seed=3)
    model = _copy_model(suite)
    result = retrieval.retrieval_scores(model, suite, progress=False)  # default: the reference's real_needle span
    assert result.scores[(0, 0)] == pytest.approx(1.0) and result.scores[(0, 1)] == 0.0
    assert str(result.heads) == "L0H0"
    needle = retrieval.retrieval_scores(model, suite, span="needle", progress=False)  # the whole needle sentence
    assert needle.scores[(0, 0)] == pytest.approx(4 / 5)
    rouge = needle.table.df[needle.table.df.metric == "rouge1_recall"].iloc[0]
    assert rouge.value == 1.0 and rouge.counted and rouge.n_generated == 4


@pytest.mark.parametrize("eos", ["first answer token", "every answer token"])
def test_decoding_does_not_stop_at_the_models_eos(eos):
    """The model's own generation config names an EOS that the copy head generates: decoding goes on (the reference
    stops only at a newline), whatever a transformers release fills into generation defaults."""
    suite = needle_tokens(1, seq_len=24, vocab_size=64, needle_len=5, cue_len=1, depth=0.5, seed=3)
    model = _copy_model(suite)
    answer = suite[0].answer_ids
    ids = [answer[0]] if eos == "first answer token" else list(answer)
    model.config.eos_token_id = model.generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]
    result = retrieval.retrieval_scores(model, suite, progress=False)
    rouge = result.table.df[result.table.df.metric == "rouge1_recall"].iloc[0]
    assert rouge.n_generated == len(answer) and rouge.response == " ".join(map(str, answer))
    assert result.scores[(0, 0)] == pytest.approx(1.0)


def test_greedy_decode_stops_after_a_newline_token_and_scores_it():
    """Reference ``decode`` (L235-247): the newline step is appended and scored, then the loop breaks."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["the cat\nsat on\nthe mat"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and retrieval._is_newline(tok, newline[0])
    assert not retrieval._is_newline(tok, tok("cat", add_special_tokens=False)["input_ids"][0])
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=16, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    free = retrieval.greedy_decode(model, [1, 2, 3], max_new_tokens=6)
    assert len(free) == 6
    stop_at = free[2]
    stopped = retrieval.greedy_decode(model, [1, 2, 3], max_new_tokens=6, stop=lambda t: t == stop_at)
    assert stopped == free[:free.index(stop_at) + 1]  # the stopping token is kept (and so scored)


def test_answer_span_is_located_never_replaced_by_the_needle():
    """Items with only the needle's span: the answer is found by the reference's search, or an error."""
    suite = needle_tokens(2, seq_len=24, vocab_size=64, needle_len=5, cue_len=2, depth=0.5, seed=1)
    for item in suite:
        expected = tuple(item.metadata["answer_span"])
        del item.metadata["answer_span"]
        enc = detectors.encode_item(item, None)
        assert retrieval.needle_sample(enc, None).span == expected  # found by find_needle on answer_ids
        assert retrieval.needle_sample(enc, None, span="needle").span == tuple(item.metadata["needle_span"])
    lost = PromptItem(ids=[1, 2, 3, 4, 5, 6], answer_ids=[9, 9, 8], metadata={"needle_span": [1, 4]})
    with pytest.raises(InputError, match="answer tokens are not in the prompt") as err:
        retrieval.needle_sample(detectors.encode_item(lost, None), None)
    assert err.value.fix


def test_text_answer_span_from_character_spans(minilm):
    """A text item with character spans only: the answer's tokens (1-2 wordpieces), not the 10+ token needle."""
    from attnscope.datasets import needle_text

    tok = minilm.tokenizer
    suite = needle_text(3, context_length=60, seed=0)  # no tokenizer: character spans only
    for item in suite:
        assert "answer_span" not in item.metadata and "answer_span_chars" in item.metadata
        enc = detectors.encode_item(item, tok)
        start, end = retrieval.needle_sample(enc, tok).span
        code = item.answer_text.strip()
        assert tok.decode(enc.ids[start:end]).replace(" ", "") == code
        n_start, n_end = retrieval.needle_sample(enc, tok, span="needle").span
        assert n_start <= start < end <= n_end and n_end - n_start > end - start


def _reference_retrieval_scores(model, prompt, real_needle_ids, decode_len):
    """Transcription of nightdessert/Retrieval_Head ``retrieval_head_detection.py``: ``find_needle_idx`` (L249-259,
    >90% token-set overlap), prefill ``input_ids[:, :-1]`` and ``decode`` (L235-247: one token a step from the last
    prompt token, ``output_attentions``), ``retrieval_calculate`` (L221-229: top-1 of the last row inside the span
    with ``prompt_ids[i] == inp`` adds ``1 / (needle_end - needle_start)``). Eager attention, our code unused."""
    span_len = len(real_needle_ids)
    start = end = -1
    for i in range(len(prompt)):
        window = set(prompt[i:i + span_len])
        if len(window & set(real_needle_ids)) / len(set(real_needle_ids)) > 0.9:
            start, end = i, i + span_len
            break
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    score = np.zeros((n_layers, n_heads))
    with torch.no_grad():
        ids = torch.tensor([prompt])
        past = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        inp, output = ids[:, -1], []
        for _ in range(decode_len):
            out = model(input_ids=inp.view(1, 1), past_key_values=past, use_cache=True, output_attentions=True)
            past, inp = out.past_key_values, out.logits[0, -1].argmax()
            output.append(int(inp))
            for layer in range(n_layers):
                for head in range(n_heads):
                    i = int(out.attentions[layer][0][head][-1].topk(1).indices[0])
                    if start <= i < end and int(inp) == prompt[i]:
                        score[layer, head] += 1 / (end - start)
    return score, output


def test_default_retrieval_score_equals_the_reference_code():
    """Identical inputs through the transcribed reference (eager) and our streaming default (SDPA)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = 1  # must not stop the decoding
    rng = np.random.default_rng(1)
    items = []
    for _ in range(3):
        prompt = rng.integers(0, 8, 40).tolist()
        answer = prompt[10:16]  # the real_needle: tokens of the context
        items.append(PromptItem(ids=prompt, answer_ids=answer, metadata={"needle_span": [5, 20]}))
    suite = PromptSuite("reference-check", items)
    ours = retrieval.retrieval_scores(model, suite, rouge_threshold=None, max_new_tokens=8, progress=False)
    model.set_attn_implementation("eager")
    per_sample = []
    for item in items:
        score, output = _reference_retrieval_scores(model, item.ids, item.answer_ids, 8)
        per_sample.append(score)
        rows = ours.table.df[(ours.table.df.metric == "rouge1_recall") & (ours.table.df["sample"] == items.index(item))]
        assert rows.iloc[0].response == " ".join(map(str, output))
    expected = np.mean(per_sample, axis=0)
    assert expected.sum() > 0  # the comparison saw copies
    for (layer, head), value in ours.scores.items():
        assert value == pytest.approx(expected[layer, head], abs=1e-12)


def test_samples_below_the_rouge_threshold_do_not_count():
    suite = needle_tokens(1, seq_len=24, vocab_size=64, needle_len=5, cue_len=1, depth=0.5, seed=3)
    model = _copy_model(suite)
    model.lm_head._forward_hooks.clear()
    model.lm_head.register_forward_hook(lambda m, a, out: out.index_fill_(-1, torch.tensor([0]), 1e4))
    result = retrieval.retrieval_scores(model, suite, progress=False)
    assert result.table.provenance["n_counted"] == 0 and len(result.heads) == 0
    assert math.isnan(result.scores[(0, 0)])


def test_streaming_retrieval_equals_recomputation_from_eager_patterns():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    items = [PromptItem(ids=rng.integers(0, 6, 30).tolist(), answer_ids=[1, 2, 3, 4, 5, 0],
                        metadata={"needle_span": [0, 30]}) for _ in range(2)]
    suite = PromptSuite("whole-prompt-needle", items)
    table = retrieval.retrieval_scores(model, suite, span="needle", rouge_threshold=None, progress=False).table
    copies = table.df[table.df.metric == "copies"].set_index(["sample", "layer", "head"])["value"]
    model.set_attn_implementation("eager")
    total = 0
    for i, item in enumerate(items):
        prompt = item.ids
        out = torch.tensor([prompt])  # greedy decoding without a cache: full forwards, no generate defaults
        with torch.no_grad():
            for _ in range(6):
                out = torch.cat([out, model(out).logits[:, -1:].argmax(-1)], 1)
        gen = out[0, len(prompt):].tolist()
        with torch.no_grad():
            att = model(out[:, :-1], output_attentions=True).attentions
        for layer in range(2):
            for h in range(4):
                top1 = [int(att[layer][0, h, len(prompt) - 1 + s].argmax()) for s in range(len(gen))]
                ref = sum(1 for i_, tok in zip(top1, gen) if i_ < len(prompt) and prompt[i_] == tok)
                assert copies[(i, layer, h)] == ref
                total += ref
    assert total > 0  # the comparison saw copies


def test_retrieval_resumes_from_its_partial_file(tmp_path, monkeypatch):
    suite = needle_tokens(2, seq_len=20, vocab_size=64, needle_len=4, depth=0.5, seed=0)
    model = tiny_text_model("llama")
    partial = tmp_path / "r.partial.parquet"
    first = retrieval.retrieval_scores(model, suite, partial=partial, progress=False)
    assert partial.is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("a resumed run decoded again")
    monkeypatch.setattr(retrieval, "decode_top_positions", no_decoding)
    again = retrieval.retrieval_scores(model, suite, partial=partial, progress=False)
    assert again.table.df["value"].tolist() == pytest.approx(first.table.df["value"].tolist(), nan_ok=True)
    with pytest.raises(InputError, match="another run"):
        retrieval.retrieval_scores(model, suite, partial=partial, topk=2, progress=False)


def test_text_needles_with_a_tokenizer(minilm):
    """Text level: the suite's token spans shift past the tokenizer's [CLS]; the prompt stops before [SEP]."""
    from attnscope.datasets import needle_text

    tok = minilm.tokenizer
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=256)
    model = attnscope.load(transformers.LlamaForCausalLM(cfg).eval(), tokenizer=tok)
    suite = needle_text(1, context_length=40, seed=0, tokenizer=tok)
    enc = detectors.encode_item(suite[0], tok)
    sample = retrieval.needle_sample(enc, tok)
    assert enc.offset == 1 and sample.ids[0] == tok.cls_token_id and tok.sep_token_id not in sample.ids
    code = suite[0].answer_text.strip()
    assert code in tok.decode(sample.ids[sample.span[0]:sample.span[1]]).replace(" ", "")
    result = retrieval.retrieval_scores(model, suite, rouge_threshold=None, max_new_tokens=5, progress=False)
    summary = result.table.df[result.table.df.metric == "rouge1_recall"].iloc[0]
    assert summary.n_generated == 5 and isinstance(summary.response, str)


# ---- StreamingLLM ------------------------------------------------------------------------------------------------

def test_rolling_cache_with_rerotated_keys_equals_recomputed_windows_in_one_layer():
    """In one layer keys and values depend on the token and its position only, so a rolling cache whose keys are
    re-rotated to their new cache index must equal re-encoding each window: an exact check of the eviction."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (40,))
    for k in (0, 1, 4):
        torch.testing.assert_close(streaming_llm.cache_nll(model, ids, k, 8),
                                   streaming_llm.recompute_nll(model, ids, k, 8), atol=1e-5, rtol=1e-5)


def _manual_streaming_nll(model, ids, n_sink, window):
    """StreamingLLM written out by hand for a Llama: per layer a list of un-rotated keys and values; at every step
    RoPE is applied to the keys at their current cache index (PAPERS.md 2.4), the query at its own index."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    base, cfg = model.model, model.config
    n_kv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache = [[] for _ in base.layers]
    nll = []
    with torch.no_grad():
        for t in range(len(ids) - 1):
            if len(cache[0]) >= n_sink + window:
                for entries in cache:
                    del entries[n_sink]
            h = base.embed_tokens(ids[t:t + 1])[None]
            for layer, entries in zip(base.layers, cache):
                attn, x = layer.self_attn, layer.input_layernorm(h)
                q = attn.q_proj(x).view(1, 1, -1, d).transpose(1, 2)
                entries.append((attn.k_proj(x).view(1, 1, n_kv, d).transpose(1, 2),
                                attn.v_proj(x).view(1, 1, n_kv, d).transpose(1, 2)))
                keys, values = (torch.cat([e[i] for e in entries], 2) for i in (0, 1))
                n = keys.shape[2]
                cos, sin = base.rotary_emb(x, torch.arange(n)[None])
                keys = apply_rotary_pos_emb(keys, keys, cos, sin)[1]
                q = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])[0]
                groups = q.shape[1] // n_kv
                keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
                probs = torch.softmax(q @ keys.transpose(-1, -2) * d ** -0.5, -1)
                h = h + attn.o_proj((probs @ values).transpose(1, 2).reshape(1, 1, -1))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            logits = model.lm_head(base.norm(h))[0, -1]
            nll.append(-torch.log_softmax(logits, -1)[ids[t + 1]])
    return torch.stack(nll)


def test_rolling_cache_matches_a_hand_written_streaming_llm_in_two_layers():
    model = tiny_text_model("llama")  # 2 layers, GQA
    ids = torch.randint(0, 64, (24,))
    for k in (0, 2):
        torch.testing.assert_close(streaming_llm.cache_nll(model, ids, k, 6), _manual_streaming_nll(model, ids, k, 6),
                                   atol=1e-4, rtol=1e-4)


def test_windows_without_eviction_equal_dense_and_recompute_matches_a_plain_loop():
    model = tiny_text_model("llama")
    ids = torch.randint(0, 64, (20,))
    dense = streaming_llm.dense_nll(model, ids)
    torch.testing.assert_close(streaming_llm.recompute_nll(model, ids, 0, 40), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(streaming_llm.cache_nll(model, ids, 0, 40), dense, atol=1e-5, rtol=1e-5)
    k, w = 2, 5
    plain = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            ctx = ids[:t] if t <= k + w else torch.cat([ids[:k], ids[t - w:t]])
            plain.append(-torch.log_softmax(model(ctx[None]).logits[0, -1], -1)[ids[t]])
    torch.testing.assert_close(streaming_llm.recompute_nll(model, ids, k, w, batch_size=5), torch.stack(plain),
                               atol=1e-5, rtol=1e-5)
    table = streaming_llm.streaming_perplexity(model, ids, window=w, n_sinks=(0, k), progress=False)
    row = table.df[(table.df.metric == "perplexity") & (table.df.n_sink == k)].iloc[0]
    assert row.value == pytest.approx(math.exp(float(torch.stack(plain)[k + w:].mean())), rel=1e-5)


# ---- CLI ---------------------------------------------------------------------------------------------------------

def test_cli_scores_a_local_model_and_removes_its_partial(tmp_path, capsys):
    from attnscope.cli import main

    model_dir = tmp_path / "tiny"
    tiny_text_model("llama").save_pretrained(model_dir)
    out = tmp_path / "r.parquet"
    rc = main(["score", "retrieval", "--model", str(model_dir), "--suite", "needle", "--n-items", "2",
               "--seq-len", "20", "--out", str(out), "--no-progress"])
    assert rc == 0 and out.is_file() and not (tmp_path / "r.partial.parquet").exists()
    printed = capsys.readouterr().out
    assert "retrieval_score" in printed and "retrieval heads" in printed
    table = attnscope.ResultTable.load(out)
    assert set(table.df.metric) == {"retrieval_score", "rouge1_recall", "copies"}
    rc = main(["score", "induction", "--model", str(model_dir), "--suite", "induction", "--n-items", "2",
               "--seq-len", "16", "--heads", "L1H*", "--out", str(out), "--no-progress"])
    assert rc == 0 and set(attnscope.ResultTable.load(out).df.layer) == {1}


@pytest.mark.parametrize("args,needle", [
    (["score", "no-such-analysis", "--model", "x", "--suite", "induction", "--out", "x"], "unknown analysis"),
    (["score", "sinks", "--model", "minilm", "--suite", "no-such-suite", "--out", "x"], "unknown suite"),
])
def test_cli_bad_input_is_one_line(args, needle, capsys):
    from attnscope.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
