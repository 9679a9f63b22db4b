"""Token spans of whole diffusers pipelines whose denoiser orders its own joint sequence (Flux: text FIRST).

The oracle is what the denoiser itself did: every record's ``meta["blocks"]`` (where the text and the latent tokens
sit in the joint sequence the attention saw) and ``meta["grid"]``, and the T5 tokenizer's own tokens of the prompt.
The pipeline-level ``trace.tokens`` must say the same; before the fix it described an SD3 layout
(``[CLIP tokens; T5 tokens]``, no latent span, no grid) for Flux.
"""

import pytest
import torch

import attnscope
from attnscope.probes.adapters.tiny_pipelines import tiny_flux_pipeline

PROMPT = "a red cat"
MAX_SEQ = 8


@pytest.fixture(scope="module")
def flux_trace():
    pipe = tiny_flux_pipeline()
    inputs = {"prompt": PROMPT, "num_inference_steps": 2, "height": 32, "width": 32, "max_sequence_length": MAX_SEQ,
              "guidance_scale": 1.0, "output_type": "latent", "generator": torch.Generator().manual_seed(0)}
    return pipe, attnscope.capture(pipe, inputs)


def test_flux_pipeline_spans_are_the_denoisers_own_blocks(flux_trace):
    pipe, trace = flux_trace
    spans = trace.tokens.spans
    text = [s for s in spans if s.modality in ("text", "special")]
    latent = [s for s in spans if s.modality == "latent"]
    records = [r for r in trace.records.values() if r.site.kind == "joint"]
    assert len(records) == 4  # one double- and one single-stream block, 2 steps
    for record in records:
        blocks = record.meta["blocks"]
        assert [min(s.start for s in text), max(s.end for s in text)] == blocks["text"] == [0, MAX_SEQ]
        assert [(s.start, s.end) for s in latent] == [tuple(blocks["image"])]
        assert list(trace.tokens.grid) == record.meta["grid"]
    want = pipe.tokenizer_2.convert_ids_to_tokens(
        pipe.tokenizer_2(PROMPT, padding="max_length", max_length=MAX_SEQ, truncation=True).input_ids)
    assert trace.tokens.strings[0][:MAX_SEQ] == want
    assert want[:3] == ["▁a", "▁red", "▁cat"] and trace.tokens.strings[0].index("▁red") == 1  # text first
    assert all(s == "" for s in trace.tokens.strings[0][MAX_SEQ:])  # latent positions carry no text


def test_flux_word_positions_are_the_t5_keys_daam_reads(flux_trace):
    """DAAM and the live page find a word's text keys with ``word_positions``: on Flux they are the T5 tokens of the
    joint sequence (text first), where the captured strings hold the word, not CLIP positions (CLIP only makes
    the pooled vector; its positions of ``red`` are 2..4, T5's is 1)."""
    from attnscope.circuits._diffusion import word_positions

    pipe, trace = flux_trace
    strings = trace.tokens.strings[0][:MAX_SEQ]
    for word in PROMPT.split():
        assert word_positions(pipe, PROMPT, word) == [i for i, s in enumerate(strings) if s == f"▁{word}"]
