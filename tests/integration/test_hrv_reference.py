"""HRV's defaults follow the reference protocol of SNU-DRL/HRV (``head_relevance_calculation.py``, commit 414122f).

Oracle: a plain-torch transcription of the reference, written here from its text and sharing no code with
``attnscope.circuits.hrv``: its own denoising loop (L203-210, L222-229, L250-276), ONE noise generator made before
the prompt loop (L466-469), and a replacement processor on every cross-attention module that draws one word per
concept at every call (L331-336), builds the concept keys (L338-352) and votes (L353-368). The only stand-in: the
reference draws the words from torch's global generator, which it never seeds; here a private generator seeded
``SAMPLE_SEED`` plays that part (the library's ``sample_seed``). The tiny SD pipeline runs with DDIM, whose
``init_noise_sigma`` is 1 and whose deterministic step makes the reference loop and the diffusers pipeline agree.
"""

import random

import pytest
import torch

from attnscope.circuits.hrv import WordSampler, head_relevance, relevance_counts
from attnscope.errors import InputError
from attnscope.probes.adapter import adapter_for
from tiny_diffusion import BUILDERS, call_kwargs

# three words per concept (the reference assumes the same count for every concept: L333-334)
CONCEPTS = {"colour": ["red", "blue", "green"], "animal": ["dog", "cat", "bird"],
            "shape": ["circle", "square", "star"]}
PROMPTS = ["a red cat", "a big blue dog", "a green star"]
STEPS, GUIDANCE, SEED, SAMPLE_SEED = 3, 7.5, 22, 5


@pytest.fixture(scope="module")
def pipe():
    return BUILDERS["unet"]()


def cross_modules(pipe):
    """(name, module, first column) of every cross-attention module, columns in the library's head order."""
    table = adapter_for(pipe).inner._table()  # only to name the modules: columns follow sorted sites
    rows = [(n, m) for n, m, site in sorted(table, key=lambda e: e[2]) if site.kind == "cross"]
    out, col = [], 0
    for name, module in rows:
        out.append((name, module, col))
        col += module.heads
    return out, col


def split_heads(x, heads):
    """``head_to_batch_dim``: [batch, token, heads * d] -> [batch * heads, token, d]."""
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).permute(0, 2, 1, 3).reshape(b * heads, n, hd // heads)


class ReferenceRun:
    """The reference's word embeddings (``desc_embeddings``, ``len_tokens``), its word draws and its votes."""

    def __init__(self, pipe, concept_words, sample_seed, n_heads):
        tok = pipe.tokenizer
        self.flat = [w for ws in concept_words.values() for w in ws]  # concept-major blocks of K words (L334)
        self.k, self.c = len(next(iter(concept_words.values()))), len(concept_words)
        # descriptions_to_text_embeddings.py L76-81 encodes each word padded to 77 tokens; CLIP's text encoder is
        # causal, so the word's rows are those of the word encoded alone, which we use to get bit-equal inputs
        # (padded encoding differs by rounding only: checked in test_word_embeddings_match_padded_encoding)
        self.emb = [pipe.text_encoder(torch.tensor([tok(w)["input_ids"]]))[0][0] for w in self.flat]
        self.len_tokens = [len(tok.encode(w)) for w in self.flat]  # with SOT and EOT (L79-81)
        self.words = torch.Generator().manual_seed(sample_seed)  # stand-in for the global RNG of L333
        self.step, self.drawn = 0, []
        self.counts = {}  # step -> [concept, head]
        self.n_heads = n_heads

    def vote(self, attn, hidden_states, column):
        query = split_heads(attn.to_q(hidden_states), attn.heads)  # L314, L325
        index = torch.arange(0, len(self.flat), self.k) + torch.randint(0, self.k, (self.c,),
                                                                         generator=self.words)  # L333-334
        self.drawn.append(tuple(self.flat[int(i)] for i in index))
        lens = [self.len_tokens[int(i)] for i in index]  # L336
        pieces = []
        for j, i in enumerate(index.tolist()):  # L338-347: first word keeps SOT, no EOT
            n = lens[j] - 2
            pieces.append(self.emb[i][:n + 1] if j == 0 else self.emb[i][1:n + 1])
        keys = split_heads(attn.to_k(torch.cat(pieces)[None]), attn.heads)  # L348-352: [heads, tokens, d]
        cond = query[query.shape[0] // 2:]  # L353: the conditional half of the CFG batch
        scores = torch.baddbmm(torch.empty(cond.shape[0], cond.shape[1], keys.shape[1]), cond,
                               keys.transpose(-1, -2), beta=0, alpha=attn.scale)
        probs = scores.softmax(-1).mean(1)  # L353-354: softmax over all concept tokens, mean over image queries
        sims, cnt = [], 0
        for j, n in enumerate(lens):  # L357-365: mean over each word's tokens (the first word's SOT skipped)
            n -= 2
            if j == 0:
                sims.append(probs[:, 1:n + 1].mean(1))
                cnt += n + 1
            else:
                sims.append(probs[:, cnt:cnt + n].mean(1))
                cnt += n
        result = torch.stack(sims, -1)  # [heads, concepts]
        one_hot = torch.zeros_like(result).scatter_(1, result.argmax(-1, keepdim=True), 1)  # L367-368
        counts = self.counts.setdefault(self.step, torch.zeros(self.c, self.n_heads))
        counts[:, column:column + attn.heads] += one_hot.T


class VotingProcessor:
    """The module's own processor for its output, plus the reference vote (the reference's ``ca_forward``)."""

    def __init__(self, original, run, column):
        self.original, self.run, self.column = original, run, column

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        self.run.vote(attn, hidden_states, self.column)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)


def reference_generation(pipe, prompt, generator, steps, guidance, run):
    """``text2image_ldm_stable`` (L250-276) with ``init_latent`` (L222-229) and ``diffusion_step`` (L203-210)."""
    tok = pipe.tokenizer
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    cond = pipe.text_encoder(ids)[0]
    uncond = pipe.text_encoder(tok([""], padding="max_length", max_length=ids.shape[-1],
                                   return_tensors="pt").input_ids)[0]
    context = torch.cat([uncond, cond])
    size = pipe.unet.config.sample_size  # the reference: 512 // 8
    latents = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=generator)
    pipe.scheduler.set_timesteps(steps)
    for i, t in enumerate(pipe.scheduler.timesteps):
        run.step = i
        noise = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context)["sample"]
        uncond_pred, cond_pred = noise.chunk(2)
        noise = uncond_pred + guidance * (cond_pred - uncond_pred)
        latents = pipe.scheduler.step(noise, t, latents)["prev_sample"]
    return latents


def reference_counts(pipe, prompts, concept_words, steps=STEPS, guidance=GUIDANCE, seed=SEED,
                     sample_seed=SAMPLE_SEED):
    """Per-step counts ``{step: [concept, head]}`` of the reference protocol, and the words drawn per call."""
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.init_noise_sigma == 1.0
    modules, n_heads = cross_modules(pipe)
    run = ReferenceRun(pipe, concept_words, sample_seed, n_heads)
    saved = [(m, m.processor) for _, m, _ in modules]
    for _, m, col in modules:
        m.set_processor(VotingProcessor(m.processor, run, col))
    try:
        generator = torch.Generator().manual_seed(seed)  # L466: once, before the prompt loop
        with torch.no_grad():
            for prompt in prompts:  # L467-469
                reference_generation(pipe, prompt, generator, steps, guidance, run)
    finally:
        for m, processor in saved:
            m.set_processor(processor)
    return run.counts, run.drawn


def library(pipe, prompts=PROMPTS, n_steps=STEPS, **options):
    return head_relevance(pipe, prompts, CONCEPTS, num_inference_steps=n_steps,
                          guidance_scale=GUIDANCE, seed=SEED, sample_seed=SAMPLE_SEED,
                          pipeline_kwargs={"output_type": "latent"}, **options)


def test_default_counts_equal_the_reference_transcription(pipe):
    per_step, drawn = reference_counts(pipe, PROMPTS, CONCEPTS)
    expected = sum(per_step.values())
    hrv = library(pipe)
    assert hrv.options["noise"] == "shared_generator" and hrv.options["word_sampling"] == "per_call"
    assert sorted(per_step) == list(range(STEPS))
    assert float(expected.sum()) == len(PROMPTS) * STEPS * len(hrv.heads)  # one vote per head, step and prompt
    assert torch.equal(hrv.counts, expected)
    assert len(drawn) == len(PROMPTS) * STEPS * len(cross_modules(pipe)[0])  # one draw per cross-attention call
    # the oracle tells the protocols apart: the earlier protocol gives other counts on these inputs
    old = library(pipe, noise="per_prompt_seed", word_sampling="per_prompt")
    assert not torch.equal(old.counts, expected)


def test_counting_some_steps_keeps_drawing_at_the_others(pipe):
    per_step, _ = reference_counts(pipe, PROMPTS[:2], CONCEPTS)
    hrv = library(pipe, PROMPTS[:2], steps=[1])
    assert torch.equal(hrv.counts, per_step[1])


def test_default_noise_differs_between_prompts_and_follows_one_generator(pipe):
    shape = (1, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    seen = []

    def keep(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        seen.append(sample[sample.shape[0] // 2:].clone())

    handle = pipe.unet.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        library(pipe, PROMPTS[:2], n_steps=1)
        shared, seen[:] = list(seen), []
        library(pipe, PROMPTS[:2], n_steps=1, noise="per_prompt_seed")
        per_prompt = list(seen)
    finally:
        handle.remove()
    generator = torch.Generator().manual_seed(SEED)
    draws = [torch.randn(shape, generator=generator) for _ in range(2)]  # L466 + L224-227, prompt after prompt
    assert len(shared) == len(per_prompt) == 2  # one UNet call per prompt (1 step)
    assert torch.equal(shared[0], draws[0]) and torch.equal(shared[1], draws[1])
    assert not torch.equal(shared[0], shared[1])
    assert torch.equal(per_prompt[0], draws[0]) and torch.equal(per_prompt[1], draws[0])


def test_words_are_drawn_again_at_every_cross_attention_call(pipe, monkeypatch):
    drawn = []
    original = WordSampler.draw

    def recording(self):
        drawn.append(tuple(original(self)))
        return list(drawn[-1])

    monkeypatch.setattr(WordSampler, "draw", recording)
    n_sites = len(cross_modules(pipe)[0])
    library(pipe, PROMPTS[:2], n_steps=2)
    assert len(drawn) == 2 * 2 * n_sites
    for prompt in range(2):
        calls = drawn[prompt * 2 * n_sites:(prompt + 1) * 2 * n_sites]
        assert len(set(calls)) > 1  # new words within one generation
    assert len(set(drawn[:n_sites])) > 1  # the sites of one step see different words
    generator, words = torch.Generator().manual_seed(SAMPLE_SEED), list(CONCEPTS.values())
    stream = [tuple(ws[i] for ws, i in zip(words, torch.randint(0, 3, (3,), generator=generator).tolist()))
              for _ in drawn]  # L333-334, one draw per call in call order
    assert drawn == stream
    _, reference_drawn = reference_counts(pipe, PROMPTS[:2], CONCEPTS, steps=2)
    assert drawn == reference_drawn
    drawn.clear()
    library(pipe, PROMPTS[:2], n_steps=2, word_sampling="per_prompt")
    assert drawn == []  # per prompt: python's random, once per prompt


def test_earlier_protocol_stays_available(pipe):
    hrv = library(pipe, noise="per_prompt_seed", word_sampling="per_prompt")
    rng, expected = random.Random(SAMPLE_SEED), 0
    for prompt in PROMPTS:
        words = [rng.choice(ws) for ws in CONCEPTS.values()]
        expected = expected + relevance_counts(pipe, prompt, words, seed=SEED, pipeline_kwargs={
            "num_inference_steps": STEPS, "guidance_scale": GUIDANCE})[0]
    assert torch.equal(hrv.counts, expected)
    assert hrv.options["noise"] == "per_prompt_seed" and hrv.options["word_sampling"] == "per_prompt"


def test_word_sampler_matches_the_vectorised_draw():
    equal = WordSampler({"a": ["x", "y", "z"], "b": ["u", "v", "w"]}, seed=3)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        index = torch.randint(0, 3, (2,), generator=generator).tolist()
        assert equal.draw() == [["x", "y", "z"][index[0]], ["u", "v", "w"][index[1]]]
    unequal = WordSampler({"a": ["x", "y"], "b": ["u", "v", "w", "t"]}, seed=3)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        i, j = (int(torch.randint(0, n, (1,), generator=generator)) for n in (2, 4))
        assert unequal.draw() == [["x", "y"][i], ["u", "v", "w", "t"][j]]


def test_word_embeddings_match_padded_encoding(pipe):
    tok = pipe.tokenizer
    words = [w for ws in CONCEPTS.values() for w in ws]
    ids = tok(words, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        padded = pipe.text_encoder(ids)[0]
        for i, word in enumerate(words):
            alone = pipe.text_encoder(torch.tensor([tok(word)["input_ids"]]))[0][0]
            torch.testing.assert_close(alone, padded[i, :alone.shape[0]], rtol=0, atol=1e-5)


def test_bad_protocol_options_are_input_errors(pipe):
    with pytest.raises(InputError, match="noise"):
        library(pipe, PROMPTS[:1], noise="fresh")
    with pytest.raises(InputError, match="word_sampling"):
        library(pipe, PROMPTS[:1], word_sampling="per_step")
    sd3 = BUILDERS["sd3"]()
    with pytest.raises(InputError, match="per-call"):
        head_relevance(sd3, ["a cat"], {"colour": ["red", "blue"]}, word_sampling="per_call",
                       pipeline_kwargs=call_kwargs("sd3"))
