"""Head Relevance Vectors on SD3 joint attention (our probe-pass adaptation) and ordered weakening on SD3.

Oracles: a brute-force HRV written here from forward hooks (image queries ``norm_q(to_q(x))`` of every joint block
in the generation pass; text keys ``norm_added_k(add_k_proj(c))`` of a probe pass the test runs itself at each
step's conditional latent and timestep); a planted head whose query is constant and whose keys separate the two
concept words by construction; plain pipeline runs for the bit-identity of the generation.
"""

import math

import pytest
import torch
from beartype import beartype
from jaxtyping import jaxtyped

from attnscope import Site
from attnscope.circuits.hrv import head_relevance, relevance_counts
from attnscope.circuits.hrv_joint import JointHrvRecorder, concept_sequence, encode_concepts
from attnscope.errors import InputError
from tiny_diffusion import BUILDERS, call_kwargs

CONCEPTS = {"colour": ["red"], "animal": ["dog"], "shape": ["circle"]}
# text-block positions of the concept sequence "red dog circle", by hand: the CLIP block (16 positions) is
# character level with a start token ('<|startoftext|>' 0, 'r' 'e' 'd</w>' 1-3, 'd' 'o' 'g</w>' 4-6,
# 'c' 'i' 'r' 'c' 'l' 'e</w>' 7-12); the T5 block (word level) starts at 16: '▁red' 16, '▁dog' 17, '▁circle' 18
WORD_POSITIONS = [[1, 2, 3, 16], [4, 5, 6, 17], [7, 8, 9, 10, 11, 12, 18]]


@pytest.fixture(scope="module")
def pipe():
    return BUILDERS["sd3"]()


def split_heads(x, heads):
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # [batch, head, token, d]


def hooked(modules_hooks):
    return [m.register_forward_pre_hook(h, with_kwargs=True) for m, h in modules_hooks]


def brute_force_hrv(pipe, prompt, words, positions, steps=2, guidance=4.0):
    """Counts [word, (block, head)] from hooks; the probe pass and the keys are computed here."""
    tr = pipe.transformer
    attns = [block.attn for block in tr.transformer_blocks]  # the joint attention of every block
    calls, queries = [], [[] for _ in attns]

    def image_query(i):
        def hook(mod, args, kwargs):
            q = split_heads(mod.to_q(kwargs["hidden_states"]), mod.heads)
            queries[i].append(mod.norm_q(q) if mod.norm_q is not None else q)
        return hook

    handles = hooked([(tr, lambda m, a, kw: calls.append((kw["hidden_states"], kw["timestep"])))]
                     + [(a, image_query(i)) for i, a in enumerate(attns)])
    try:
        with torch.no_grad():
            pipe(prompt, generator=torch.Generator().manual_seed(22), **call_kwargs("sd3", steps, guidance))
    finally:
        for h in handles:
            h.remove()
    text = " ".join(words)
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(text, text, text, do_classifier_free_guidance=False,
                                               max_sequence_length=8)
    flat = [p for ps in positions for p in ps]
    spans, start = [], 0
    for ps in positions:
        spans.append(list(range(start, start + len(ps))))
        start += len(ps)
    counts, scores = torch.zeros(len(words), 2 * len(attns)), []
    for step, (latent, t) in enumerate(calls):
        contexts = {}
        handles = hooked([(a, lambda m, args, kw, i=i: contexts.__setitem__(i, kw["encoder_hidden_states"]))
                          for i, a in enumerate(attns)])
        try:
            with torch.no_grad():  # the probe: conditional latent and timestep, the concept words as text
                tr(hidden_states=latent[1:], encoder_hidden_states=emb, pooled_projections=pooled, timestep=t[1:])
        finally:
            for h in handles:
                h.remove()
        for i, attn in enumerate(attns):
            with torch.no_grad():
                k = split_heads(attn.add_k_proj(contexts[i]), attn.heads)
                k = (attn.norm_added_k(k) if attn.norm_added_k is not None else k)[0][:, flat]
            q = queries[i][step][1]  # conditional CFG half
            per_head = []
            for h in range(attn.heads):
                p = torch.softmax(q[h] @ k[h].T / math.sqrt(q.shape[-1]), -1).mean(0)
                per_word = torch.stack([p[s].mean() for s in spans])
                counts[int(per_word.argmax()), attn.heads * i + h] += 1
                per_head.append(per_word)
            scores.append(torch.stack(per_head))
    return counts, scores  # scores: per (step, block), [head, word] before the argmax


def test_concept_positions_are_the_word_tokens_of_both_encoders(pipe):
    positions, slices = concept_sequence(pipe, ["red", "dog", "circle"], 8)
    assert [positions[s] for s in slices] == WORD_POSITIONS
    with_start, slices = concept_sequence(pipe, ["red", "dog"], 8, keep_start=True)
    assert with_start == [0, 1, 2, 3, 16, 4, 5, 6, 17] and slices[0] == slice(1, 5)
    with pytest.raises(InputError):  # 8 + 6 + 6 characters: more than the 16-token CLIP block holds
        concept_sequence(pipe, ["triangle", "square", "yellow"], 8)
    emb, pooled = jaxtyped(typechecker=beartype)(encode_concepts)(pipe, ["red", "dog"], 8)
    assert emb.shape == (1, 16 + 8, 12) and pooled.shape == (1, 6)  # [CLIP; T5] block, pooled CLIP-L + CLIP-G


def test_sd3_hrv_counts_equal_a_brute_force_recomputation(pipe, monkeypatch):
    seen = []  # white box: the per-word scores each vote is taken from, in call order
    original = JointHrvRecorder._vote
    monkeypatch.setattr(JointHrvRecorder, "_vote", lambda self, site, probs: (
        seen.append(torch.stack([probs[0, :, sl].mean(-1) for sl in self.slices], -1)), original(self, site, probs)))
    hrv = head_relevance(pipe, ["a red cat"], CONCEPTS, num_inference_steps=2, guidance_scale=4.0,
                         pipeline_kwargs=call_kwargs("sd3"))
    assert [(str(s), h) for s, h in hrv.heads] == [(f"mmdit.L{b}.joint", h) for b in range(3) for h in range(2)]
    expected, scores = brute_force_hrv(pipe, "a red cat", ["red", "dog", "circle"], WORD_POSITIONS)
    assert len(seen) == len(scores) == 2 * 3  # steps x joint blocks
    for got, want in zip(seen, scores):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(hrv.counts, expected)
    assert float(hrv.counts.sum()) == 2 * len(hrv.heads)  # every head votes once per step
    assert int((hrv.counts.sum(1) > 0).sum()) >= 2  # the votes are not all on one concept (the check can fail)
    used = hrv.counts.sum(1) > 0
    torch.testing.assert_close(hrv.vectors().abs().sum(1), used.float() * len(hrv.heads))
    assert hrv.options["attention"] == "joint" and hrv.options["keep_start"] is False


def test_tracking_leaves_the_generation_bit_identical_and_unseen(pipe):
    kwargs = call_kwargs("sd3", steps=3)
    seen = {"transformer": 0, "attn": 0}
    handles = [pipe.transformer.register_forward_pre_hook(lambda *a: seen.__setitem__("transformer",
                                                                                       seen["transformer"] + 1)),
               pipe.transformer.transformer_blocks[1].attn.register_forward_pre_hook(
                   lambda *a: seen.__setitem__("attn", seen["attn"] + 1))]
    try:
        counts, heads, output = relevance_counts(pipe, "a red cat", ["red", "dog"], seed=5, pipeline_kwargs=kwargs)
    finally:
        for h in handles:
            h.remove()
    assert seen == {"transformer": 3, "attn": 3}  # the probe passes are invisible to other hooks
    assert float(counts.sum()) == 3 * len(heads)  # ... yet they ran: one vote per head and step
    plain = pipe("a red cat", generator=torch.Generator().manual_seed(5), **kwargs).images
    assert torch.equal(output.images, plain)
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer.transformer_blocks[1].attn._forward_hooks


def test_planted_joint_head_prefers_its_concept():
    pipe = BUILDERS["sd3"]()  # a fresh copy: its weights are edited
    tr = pipe.transformer
    block = tr.transformer_blocks[0]
    attn, d = block.attn, block.attn.to_q.out_features // block.attn.heads
    with torch.no_grad():
        emb = pipe.encode_prompt("red dog", "red dog", "red dog", do_classifier_free_guidance=False,
                                 max_sequence_length=8)[0]
        block.norm1_context.linear.weight.zero_()  # no AdaLN modulation of block 0's text stream: text = LN(c)
        block.norm1_context.linear.bias.zero_()
        text = block.norm1_context.norm(tr.context_embedder(emb))[0]
        red, dog = [1, 2, 3, 16], [4, 5, 6, 17]
        x = torch.cat([text[red + dog], torch.ones(8, 1)], 1)
        target = torch.tensor([1.0] * 4 + [-1.0] * 4)
        sol = torch.linalg.pinv(x) @ target  # a_t = w.text_t + b: +1 on every red token, -1 on every dog token
        a = x @ sol
        assert bool((a[:4] > 0.5).all() and (a[4:] < -0.5).all())
        # head 0: constant query u; key of token t = a_t u (RMS-normed to 2 sign(a_t) u): red >> dog for any query
        attn.to_q.weight[:d] = 0
        attn.to_q.bias[:d] = torch.eye(d)[0]
        attn.add_k_proj.weight[:d] = 0
        attn.add_k_proj.bias[:d] = 0
        attn.add_k_proj.weight[0] = sol[:-1]
        attn.add_k_proj.bias[0] = sol[-1]
    hrv = head_relevance(pipe, ["a big cat", "a dog"], {"colour": ["red"], "animal": ["dog"]},
                         guidance_scale=4.0, pipeline_kwargs=call_kwargs("sd3", steps=3))
    column = hrv.heads.index((Site("mmdit", 0, "joint"), 0))
    assert hrv.counts[:, column].tolist() == [6.0, 0.0]  # 2 prompts x 3 steps, all on "colour"
    assert hrv.ranking("colour")[0] == (Site("mmdit", 0, "joint"), 0)
    assert hrv.ranking("animal", "LeRHF")[0] == (Site("mmdit", 0, "joint"), 0)
