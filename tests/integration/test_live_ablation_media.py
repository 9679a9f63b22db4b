"""The live page's capture and ablation on a vision encoder (tiny ViT) and on a Flux pipeline capture (issue #17).

References written here, independent of attnscope's capture and edit paths: the model's own eager
``output_attentions``; plain forward pre-hooks that zero one head's slice of the output-projection input (ViT:
``layers[0].attention.o_proj``; Flux double-stream block: ``attn.to_out[0]`` for the image stream and
``attn.to_add_out`` for the text stream, the two halves of the joint sequence the head attends over); numpy total
variation, cosine, KL, rollout and pixel differences. The page's callbacks are driven through Dash's HTTP endpoint.
"""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import transformers

import attnscope
from attnscope.dashboards import live_media
from attnscope.dashboards.live_ablation import ablate
from attnscope.errors import InputError
from attnscope.probes.coverage import ARCHITECTURES
from attnscope.tasks.heatmap_job import image_of

HEAD, D_HEAD = 1, 8  # ablated head L0H1; both tiny models have heads of 8


@pytest.fixture(scope="module")
def vit():
    model = ARCHITECTURES["vit"].builder()  # 2 layers x 4 heads, 16x16 images, 4x4 patches
    return model, attnscope.load(model)


@pytest.fixture(scope="module")
def flux():
    from attnscope.probes.adapters.tiny_pipelines import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    return pipe, attnscope.load(pipe)


def check_error(error):
    assert isinstance(error, InputError) and error.expected and error.got and error.fix


@contextmanager
def zeroed(projections, head=HEAD):
    """Plain forward pre-hooks zeroing ``head``'s slice of each projection's input."""
    def zero(_module, args):
        x = args[0].clone()
        x[..., head * D_HEAD:(head + 1) * D_HEAD] = 0
        return (x,) + args[1:]
    handles = [p.register_forward_pre_hook(zero) for p in projections]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def eager(model, pixels):
    """(``[layer, head, query, key]``, output) of the model's own eager attention."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation("sdpa")
    return np.stack([a[0].numpy() for a in out.attentions]), out


def tv(before, after):
    return 0.5 * np.abs(np.asarray(before, np.float64) - np.asarray(after, np.float64)).sum(-1).mean(-1)


def one_minus_cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def vision_capture(handle, example=1):
    return live_media.capture_media(live_media.Uploads(), handle, "tiny-vit", "", (f"example:{example}", None, None))


# ---- vision encoder ------------------------------------------------------------------------------------------------


def test_vision_capture_is_the_models_eager_attention_over_cls_and_patches(vit):
    model, handle = vit
    assert live_media.model_kind(handle) == "vision"
    cap = vision_capture(handle)  # empty text box: a vision encoder reads no text
    image = live_media.make_scene(live_media.EXAMPLE_SEED, 1).image  # 16x16: the model's size, no resize
    by_hand = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None] / 255 * 2 - 1  # mean / std 0.5
    torch.testing.assert_close(cap.inputs["pixel_values"], by_hand, atol=1e-6, rtol=0)
    assert cap.kind == "vision" and cap.tower == "vision" and (cap.n_layers, cap.n_heads) == (2, 4)
    assert cap.tokens == ["[CLS]"] + [f"patch {r},{c}" for r in range(4) for c in range(4)]
    assert cap.media.grid == (4, 4) and cap.media.image_positions == list(range(1, 17))
    clean, _ = eager(model, by_hand)
    np.testing.assert_allclose(cap.attn(), clean, atol=1e-5)
    head_map = live_media.vlm_image_map(cap, "head", 1, 2).values  # the selected head's row of [CLS]
    np.testing.assert_allclose(head_map, clean[1, 2, 0, 1:].reshape(4, 4), atol=1e-5)
    joint = np.eye(17)
    for layer in clean:  # Abnar & Zuidema rollout by hand, read out at [CLS]
        a = layer.mean(0) + np.eye(17)
        joint = (a / a.sum(-1, keepdims=True)) @ joint
    np.testing.assert_allclose(live_media.vlm_image_map(cap, "rollout", 0, 0).values, joint[0, 1:].reshape(4, 4),
                               atol=1e-5)


def test_vision_zero_ablation_equals_a_plain_hook_on_the_output_projection(vit):
    model, handle = vit
    cap = vision_capture(handle)
    pixels = cap.inputs["pixel_values"]
    clean, clean_out = eager(model, pixels)
    result = ablate(handle, cap, "L0H1", "zero")
    with zeroed([model.layers[0].attention.o_proj]):
        after, after_out = eager(model, pixels)
    np.testing.assert_allclose(result.attn_after, after, atol=1e-5)
    np.testing.assert_allclose(result.change, tv(clean, after), atol=1e-5)
    assert not result.change[0].any() and result.change[1].min() > 1e-4  # only the later layer moves
    np.testing.assert_allclose(result.token_change, one_minus_cosine(clean_out.last_hidden_state[0],
                                                                     after_out.last_hidden_state[0]), atol=1e-5)
    pooled = 1 - one_minus_cosine(clean_out.pooler_output[0], after_out.pooler_output[0])
    assert f"pooled image embedding cosine to clean (pooler output): {pooled:.4f}" in result.summary
    assert result.heads == "L0H1" and result.mode == "zero"


def test_vision_mean_ablation_uses_the_shapes_scenes_as_reference(vit):
    """``mean``: head 1's output replaced by its mean over every token of 64 shapes scenes; reference: the outputs
    recorded and averaged with a plain hook, then written in with another."""
    from attnscope.datasets import shapes_scenes

    model, handle = vit
    cap = vision_capture(handle, 2)
    projection = model.layers[0].attention.o_proj
    scenes = torch.cat([torch.tensor(s.image, dtype=torch.float32).permute(2, 0, 1)[None] / 255 * 2 - 1
                        for s in shapes_scenes(64, seed=1)])
    seen = []
    handle_ = projection.register_forward_pre_hook(lambda _m, args: seen.append(args[0][..., 8:16].clone()))
    try:
        with torch.no_grad():
            model(pixel_values=scenes)
    finally:
        handle_.remove()
    mean = seen[0].reshape(-1, D_HEAD).double().mean(0).float()

    def write(_module, args):
        x = args[0].clone()
        x[..., 8:16] = mean
        return (x,) + args[1:]
    result = ablate(handle, cap, "L0H1", "mean")
    handle_ = projection.register_forward_pre_hook(write)
    try:
        after, _ = eager(model, cap.inputs["pixel_values"])
    finally:
        handle_.remove()
    np.testing.assert_allclose(result.attn_after, after, atol=1e-5)
    assert "64 shapes scenes" in result.summary and result.reference
    resampled = [ablate(handle, cap, "L0H1", "resample") for _ in range(2)]
    np.testing.assert_array_equal(resampled[0].attn_after, resampled[1].attn_after)  # seeded draw
    assert not resampled[0].change[0].any() and resampled[0].change[1].max() > 1e-4


def test_vision_classifier_reports_the_class_distributions_kl_and_top_class():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=16, patch_size=4, num_labels=5)
    model = transformers.ViTForImageClassification(cfg).eval()
    handle = attnscope.load(model)
    cap = vision_capture(handle)
    result = ablate(handle, cap, "L0H1", "zero")
    _, clean = eager(model, cap.inputs["pixel_values"])
    with zeroed([model.vit.layers[0].attention.o_proj]):
        _, after = eager(model, cap.inputs["pixel_values"])
    p = torch.log_softmax(clean.logits[0].double(), -1).numpy()
    q = torch.log_softmax(after.logits[0].double(), -1).numpy()
    kl = float((np.exp(p) * (p - q)).sum())
    top = int(p.argmax())
    assert f"KL(clean ‖ ablated) {kl:.4f}" in result.summary
    assert f"top class {cfg.id2label[top]!r} p={np.exp(p[top]):.3f} → {np.exp(q[top]):.3f}" in result.summary
    np.testing.assert_allclose(result.token_change, one_minus_cosine(clean.hidden_states[-1][0],
                                                                     after.hidden_states[-1][0]), atol=1e-5)


def test_vision_errors_say_expected_got_fix(vit):
    _, handle = vit
    cap = vision_capture(handle)
    with pytest.raises(InputError) as info:
        ablate(handle, cap, "L0H1", "scramble")
    check_error(info.value)
    with pytest.raises(InputError) as info:  # no image picked
        live_media.capture_media(live_media.Uploads(), handle, "tiny-vit", "", (None, None, None))
    check_error(info.value)


# ---- Flux pipeline -------------------------------------------------------------------------------------------------


def image_text(record):
    n_txt = record.meta["blocks"]["text"][1]
    return record.probs[0, :, n_txt:, :n_txt].double().numpy()  # [head, image query, text key]


def test_flux_ablation_equals_the_pipeline_rerun_with_a_plain_hook(flux):
    pipe, handle = flux
    cap = live_media.capture_media(live_media.Uploads(), handle, "tiny-flux", "a red cat", (None, 1, 0))
    assert cap.kind == "diffusion" and [str(s) for s in cap.media.sites] == ["flux.double.L0.joint",
                                                                            "flux.single.L0.joint"]
    result = ablate(handle, cap, "L0H1", "zero")  # heads over the denoiser's attention layers: L0 = double block
    block = pipe.transformer.transformer_blocks[0].attn
    inputs = {**cap.inputs, "generator": torch.Generator().manual_seed(0)}
    with zeroed([block.to_out[0], block.to_add_out]), torch.no_grad():
        reference = attnscope.capture(handle, inputs, sites=lambda s: s.kind == "joint")
    clean_image, ref_image = image_of(cap.trace.output), image_of(reference.output)
    assert np.abs(ref_image - clean_image).max() > 1e-3  # the edit has an effect
    np.testing.assert_allclose(result.image_after, ref_image, atol=1e-5)
    expected, masses = [], []
    for site in cap.media.sites:
        before, after = cap.trace.get(site, 0), reference.get(site, 0)
        expected.append(tv(before.probs[0].numpy(), after.probs[0].numpy()))
        masses.append(image_text(after).mean((0, 1)) - image_text(before).mean((0, 1)))
        np.testing.assert_allclose(result.attn_after[len(expected) - 1], image_text(after), atol=1e-5)
    np.testing.assert_allclose(result.change, np.stack(expected), atol=1e-5)
    assert not result.change[0].any() and result.change[1].min() > 1e-5  # one step: the block's own softmax ran
    np.testing.assert_allclose(result.token_change, np.mean(masses, 0), atol=1e-6)  # first, the later block moved
    pixel = np.abs(ref_image.astype(np.float64) - clean_image).mean() * 255
    assert f"mean |Δ pixel| {pixel:.3f} (0–255 scale)" in result.summary


def test_flux_modes_without_a_reference_are_refused(flux):
    _, handle = flux
    cap = live_media.capture_media(live_media.Uploads(), handle, "tiny-flux", "a red cat", (None, 1, 0))
    for mode in ("mean", "resample"):
        with pytest.raises(InputError, match="reference") as info:
            ablate(handle, cap, "L0H1", mode)
        check_error(info.value)
    with pytest.raises(InputError) as info:
        ablate(handle, cap, "L0H1", "scramble")
    check_error(info.value)


# ---- the page: callbacks through Dash's HTTP endpoint -------------------------------------------------------------


def call(app, client, first_output, values):
    """Post one callback as the browser does; ``values``: ``id.property`` -> value of its inputs and state.
    Returns ``{id: {property: value}}`` (empty for a 204 answer)."""
    key = next(k for k in app.callback_map if k.startswith(f"..{first_output}.") or k == first_output)
    spec = app.callback_map[key]
    outputs = [tuple(part.split(".", 1)) for part in key.strip(".").split("...")]
    props = lambda items: [{**i, "value": values.get(f"{i['id']}.{i['property']}")} for i in items]  # noqa: E731
    inputs = props(spec["inputs"])
    body = {"output": key, "outputs": [{"id": i, "property": p} for i, p in outputs] if len(outputs) > 1 else
            {"id": outputs[0][0], "property": outputs[0][1]}, "inputs": inputs, "state": props(spec["state"]),
            "changedPropIds": [f"{inputs[0]['id']}.{inputs[0]['property']}"]}
    answer = client.post("/_dash-update-component", json=body)
    assert answer.status_code in (200, 204), answer.get_data(as_text=True)[:300]
    if answer.status_code == 204:
        return {}
    return {i: {p.split("@")[0]: v for p, v in props_.items()} for i, props_ in answer.get_json()["response"].items()}


def test_page_captures_and_ablates_a_vision_encoder_and_a_flux_capture(vit, flux, tmp_path):
    from attnscope.dashboards.app import create_app

    app = create_app(tmp_path, vit[1])
    client = app.server.test_client()
    shown = call(app, client, "live-vlm-inputs.style", {"live-model.value": None})
    assert shown["live-vlm-inputs"]["style"]["display"] == "flex" and "no text" in shown["live-media-hint"]["children"]
    page = {"live-capture.n_clicks": 1, "live-text.value": "", "live-mode.value": "text", "live-image.value":
            "example:0", "live-steps.value": 1, "live-seed.value": 0}
    done = call(app, client, "live-key.data", page)
    key = done["live-key"]["data"]
    assert key and done["live-error"]["children"] == "" and "17 tokens" in done["live-status"]["children"]
    card = call(app, client, "live-media-map.figure", {"live-key.data": key, "live-head.data": [1, 2],
                                                      "live-media-map-kind.value": "head"})
    assert "[CLS]" in card["live-media-map"]["figure"]["layout"]["title"]["text"]
    abl = call(app, client, "live-ablation.data", {"live-ablate.n_clicks": 1, "live-key.data": key,
                                                   "live-abl-heads.value": "L0H1", "live-abl-mode.value": "zero"})
    assert "pooled image embedding cosine" in abl["live-abl-summary"]["children"]
    views = call(app, client, "live-abl-grid.figure", {"live-ablation.data": abl["live-ablation"]["data"],
                                                      "live-head.data": [1, 0]})
    assert "ablated − clean, L1 H0" in views["live-abl-pattern"]["figure"]["layout"]["title"]["text"]
    bad = call(app, client, "live-ablation.data", {"live-ablate.n_clicks": 2, "live-key.data": key,
                                                   "live-abl-heads.value": "L9H9", "live-abl-mode.value": "zero"})
    assert bad["live-abl-summary"]["children"].count("\n") == 0 and "Traceback" not in str(bad)

    app = create_app(tmp_path, flux[1])
    client = app.server.test_client()
    done = call(app, client, "live-key.data", {**page, "live-text.value": "a red cat"})
    key = done["live-key"]["data"]
    abl = call(app, client, "live-ablation.data", {"live-ablate.n_clicks": 1, "live-key.data": key,
                                                   "live-abl-heads.value": "L0H1", "live-abl-mode.value": "zero"})
    assert "mean |Δ pixel|" in abl["live-abl-summary"]["children"]
    views = call(app, client, "live-abl-grid.figure", {"live-ablation.data": abl["live-ablation"]["data"],
                                                      "live-head.data": [0, 0]})
    assert [t["type"] for t in views["live-abl-pattern"]["figure"]["data"]] == ["image", "image"]
    assert views["live-abl-tokens"]["figure"]["data"][0]["type"] == "bar"
    refused = call(app, client, "live-ablation.data", {"live-ablate.n_clicks": 2, "live-key.data": key,
                                                       "live-abl-heads.value": "L0H1", "live-abl-mode.value": "mean"})
    assert "zero" in refused["live-abl-summary"]["children"] and "Traceback" not in str(refused)
