"""The live page's image (VLM) and diffusion captures without a browser, on the zoo's trained shapes organisms:
what the page computes is compared with the library called independently in the test (``attnscope.capture`` of the
same image + question, ``daam_maps`` of the same prompt / seed / step, a numpy rollout, torch interpolation of the
trace's columns), plus uploads (Pillow only, size limits, never unpickled) and the one-line notes of views a
diffusion capture has no data for."""

import base64
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import attnscope
from attnscope.dashboards import live_media as lm
from attnscope.dashboards import live_media_views as mv
from attnscope.dashboards import live_views as views
from attnscope.dashboards.live_state import LiveSession
from attnscope.datasets.shapes import make_scene
from attnscope.errors import InputError
from attnscope.probes.site import Site

QUESTION = "what color is the square ?"
PROMPT = "red circle left blue square right"
STEPS, SEED = 3, 5


@pytest.fixture(scope="module")
def session():
    live = LiveSession()
    uploads = lm.Uploads()
    live.media_capture = lambda h, n, r, m: lm.capture_media(uploads, h, n, r, m)
    live.uploads = uploads
    return live


@pytest.fixture(scope="module")
def vlm_cap(session):
    return session.capture("zoo:shapes-vlm", QUESTION, "text", ("example:1", None, None))


@pytest.fixture(scope="module")
def vlm_reference(session):
    """Independent: attnscope.capture of the same question on the same scene image."""
    image = make_scene(lm.EXAMPLE_SEED, 1).image
    return attnscope.capture(session.model("zoo:shapes-vlm"), (QUESTION, image)), image


@pytest.fixture(scope="module")
def diff_cap(session):
    return session.capture("zoo:shapes-diffusion", PROMPT, "text", (None, STEPS, SEED))


def _png(array, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _data_url(data, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_page_offers_the_trained_vlm_and_diffusion_organisms(session):
    choices = session.choices()
    assert "zoo:shapes-vlm" in choices and "zoo:shapes-diffusion" in choices and "minilm" in choices
    assert "zoo:shapes-classifier" not in choices  # neither text nor VLM nor diffusion
    assert [lm.zoo_kind(n) for n in ("zoo:shapes-vlm", "zoo:shapes-diffusion", "zoo:induction-2l", "minilm")] == \
        ["vlm", "diffusion", "text", "text"]


def test_vlm_capture_holds_image_and_question_tokens(vlm_cap, vlm_reference):
    ref, image = vlm_reference
    assert vlm_cap.kind == "vlm" and vlm_cap.n_tokens == 22 and (vlm_cap.n_layers, vlm_cap.n_heads) == (2, 4)
    assert vlm_cap.media.image_positions == ref.tokens.positions("image") == list(range(16))
    assert vlm_cap.media.grid == (4, 4)
    np.testing.assert_array_equal(vlm_cap.media.image, image)
    assert vlm_cap.tokens[16:] == ["what", "color", "is", "the", "square", "?"]
    np.testing.assert_allclose(vlm_cap.attn(), ref.stack("text")[:, 0].numpy(), atol=1e-6)


@pytest.mark.parametrize("layer,head", [(0, 0), (1, 2), (1, 3)])
def test_vlm_head_map_is_the_last_rows_image_columns_on_the_grid(vlm_cap, vlm_reference, layer, head):
    ref, _ = vlm_reference
    row = ref.get(Site("text", layer)).probs[0, head, -1].numpy()  # the last token's attention row
    expected = row[ref.tokens.positions("image")].reshape(4, 4)  # CLIP patches are row-major
    np.testing.assert_allclose(lm.vlm_image_map(vlm_cap, "head", layer, head).values, expected, atol=1e-6)
    np.testing.assert_allclose(lm.vlm_head_maps(vlm_cap, layer)[head], expected, atol=1e-6)
    fig = mv.vlm_map_figure(vlm_cap, "head", layer, head)
    assert [t.type for t in fig.data] == ["image", "heatmap"] and fig.layout.meta == {"capture": vlm_cap.key}
    np.testing.assert_allclose(np.asarray(fig.data[1].z), expected, atol=1e-6)
    assert "last token '?'" in fig.layout.title.text and f"L{layer} H{head}" in fig.layout.title.text


def test_vlm_rollout_map_equals_a_numpy_rollout_read_at_the_last_token(vlm_cap, vlm_reference):
    ref, _ = vlm_reference
    attn = ref.stack("text")[:, 0].double().numpy()
    joint = np.eye(22)
    for layer in attn:  # Abnar & Zuidema: A_hat = rownorm(mean_h A + I), chained
        a_hat = layer.mean(0) + np.eye(22)
        joint = (a_hat / a_hat.sum(-1, keepdims=True)) @ joint
    expected = joint[-1, :16].reshape(4, 4)
    np.testing.assert_allclose(lm.vlm_image_map(vlm_cap, "rollout", 0, 0).values, expected, atol=1e-5)


def test_vlm_text_views_mark_the_image_span_and_head_view_keeps_question_tokens(vlm_cap):
    pattern = views.pattern_figure(vlm_cap, 1, 2, None)
    assert len(pattern.layout.shapes) == 2 and "image span" in pattern.layout.title.text
    assert {(s.x0, s.x1) for s in pattern.layout.shapes} >= {(-0.5, 15.5)}
    hv = views.head_view_figure(vlm_cap, 1, 2, "head", None)
    labels = {str(t) for trace in hv.data if trace.text is not None for t in trace.text}
    assert "square" in labels and "<image>" not in labels
    assert "tokens 0–15 are the image's 16 patches" in views.model_view_figure(vlm_cap, (0, 0)).layout.title.text


def test_diffusion_capture_image_equals_an_independent_run(session, diff_cap):
    pipe = session.model("zoo:shapes-diffusion").module
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=lm.GUIDANCE,
               generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    np.testing.assert_array_equal(diff_cap.media.image, np.clip(np.round(out * 255), 0, 255).astype(np.uint8))
    assert diff_cap.kind == "diffusion" and diff_cap.media.steps == STEPS and len(diff_cap.media.sites) == 4
    assert list(diff_cap.media.words) == PROMPT.split()


@pytest.mark.parametrize("word,step", [("red", 0), ("square", 2), ("circle", "all")])
def test_diffusion_map_equals_daam_maps_for_the_same_seed_prompt_and_step(session, diff_cap, word, step):
    from attnscope.circuits.daam import daam_maps

    steps = None if step == "all" else [step]
    reference = daam_maps(session.model("zoo:shapes-diffusion"), [PROMPT], [word], seed=SEED,
                          num_inference_steps=STEPS, guidance_scale=lm.GUIDANCE, steps=steps, size="image")
    drawn = lm.daam_map(diff_cap, word, step)
    assert drawn.shape == (16, 16)
    np.testing.assert_allclose(drawn, reference.maps[0, 0].numpy(), rtol=1e-5, atol=1e-7)
    fig = mv.daam_figure(diff_cap, word, step)
    np.testing.assert_allclose(np.asarray(fig.data[1].z), drawn, rtol=1e-6)
    assert repr(word) in fig.layout.title.text


def test_diffusion_per_head_maps_are_the_heads_upsampled_clamped_columns(diff_cap):
    site_index, step, word = 2, 1, "blue"
    site = diff_cap.media.sites[site_index]
    probs = diff_cap.trace.get(site, step).probs[0].double()  # [head, pixel, text key]
    side = int(round(probs.shape[1] ** 0.5))
    column = probs[:, :, diff_cap.media.words[word][0]].reshape(-1, 1, side, side)
    expected = F.interpolate(column, size=(16, 16), mode="bicubic", align_corners=False).clamp_min(0)[:, 0]
    np.testing.assert_allclose(lm.daam_head_maps(diff_cap, site_index, word, step), expected.numpy(), atol=1e-5)


def test_diffusion_text_views_say_why_they_are_empty(diff_cap):
    for fig in (views.model_view_figure(diff_cap, (0, 0)), views.pattern_figure(diff_cap, 0, 0, None),
                views.head_view_figure(diff_cap, 0, 0, "layer", None), views.qk_figure(diff_cap, 0, 0, None),
                views.long_figure(diff_cap, None, 0, "mean", None)):
        assert fig.layout.meta == {"capture": diff_cap.key} and len(fig.layout.annotations) == 1
    assert "no lines between text tokens" in views.head_view_figure(diff_cap, 0, 0, "layer", None) \
        .layout.annotations[0].text
    strip = views.attribution_figure(diff_cap)  # mean cross-attention per prompt token
    values = np.mean([diff_cap.trace.get(s, t).probs[0].double().mean((0, 1)).numpy()
                      for s in diff_cap.media.sites for t in range(STEPS)], axis=0)
    np.testing.assert_allclose(mv.token_mass_values(diff_cap)[0], values, rtol=1e-5)
    assert strip.layout.meta == {"capture": diff_cap.key}


def test_bad_diffusion_settings_and_words_raise_one_line_errors(session, diff_cap):
    for steps, seed in ((0, 0), (lm.MAX_STEPS + 1, 0), ("x", 0), (2, -1)):
        with pytest.raises(InputError, match="bad steps|bad seed"):
            session.capture("zoo:shapes-diffusion", PROMPT, "text", (None, steps, seed))
    with pytest.raises(InputError, match="word not in the prompt"):
        lm.daam_map(diff_cap, "green", 0)
    with pytest.raises(InputError, match="bad step"):
        lm.daam_map(diff_cap, "red", STEPS)
    with pytest.raises(InputError, match="no usable prompt"):
        session.capture("zoo:shapes-diffusion", "  ", "text", (None, 2, 0))
    with pytest.raises(InputError, match="no image picked"):
        session.capture("zoo:shapes-vlm", QUESTION, "text", (None, None, None))


def test_uploads_decode_png_and_jpeg_with_pillow_and_refuse_the_rest(session):
    image = make_scene(3, 0).image
    decoded = lm.decode_upload(_data_url(_png(image)), "scene.png")
    np.testing.assert_array_equal(decoded, image)
    big = np.zeros((40, 60, 3), np.uint8)
    assert lm.decode_upload(_data_url(_png(big, "JPEG"), "image/jpeg"), "x.jpg").shape == (40, 60, 3)
    bad = {"pickle": _data_url(pickle.dumps({"a": 1})), "gif": _data_url(_png(big[..., 0], "GIF")),
           "text": "data:text/plain;base64,aGVsbG8=", "not base64": "data:image/png;base64,@@@",
           "too wide": _data_url(_png(np.zeros((2, lm.MAX_UPLOAD_SIDE + 1, 3), np.uint8))),
           "too large": _data_url(b"\x89PNG" + b"0" * (lm.MAX_UPLOAD_BYTES + 1))}
    for what, url in bad.items():
        with pytest.raises(InputError) as err:
            lm.decode_upload(url, what)
        assert "\n" not in str(err.value), what
    key = session.uploads.add(np.full((32, 32, 3), 200, np.uint8), "grey.png")  # resized to the VLM's 16x16
    cap = session.capture("zoo:shapes-vlm", QUESTION, "text", (key, None, None))
    assert cap.media.image.shape == (16, 16, 3) and cap.media.label == "upload grey.png"
    assert (cap.media.image == 200).all()


def test_text_models_keep_the_text_path(session):
    cap = session.capture("minilm", "The cat sat.", "text", ("example:0", 4, 0))
    assert cap.kind == "text" and cap.media is None and cap.tokens[0] == "[CLS]"
    assert session.layer_inputs(cap, 0) is not None


def test_save_writes_media_traces_that_load_back_and_a_rollout_only_where_there_is_self_attention(
        tmp_path, session, diff_cap, vlm_cap):
    from attnscope.dashboards.files import ResultsRoot
    from attnscope.dashboards.live_save import save_capture

    root = ResultsRoot(tmp_path)
    for cap, want in ((diff_cap, ["safetensors"]), (vlm_cap, ["safetensors", "parquet"])):
        paths = save_capture(session.model(cap.model_name), cap, root)
        assert [p.rsplit(".", 1)[-1] for p in paths] == want
        loaded = attnscope.AttentionTrace.load(tmp_path / paths[0])
        assert loaded.sites == cap.trace.sites
        site = cap.trace.sites[0]
        step = cap.trace.steps(site)[0]
        np.testing.assert_array_equal(loaded.get(site, step).probs.numpy(), cap.trace.get(site, step).probs.numpy())
