"""The dashboard's image views without a browser: the map mode of traces with image structure (planted diffusion
cross-attention, a VLM-like trace with an image span), heat-map tables (DAAM form) in the Maps card and in the
head grid, and the image-file rule (next to the trace, inside the results directory only)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import attnscope
from attnscope.dashboards import PathRefused, ResultsRoot, create_app
from attnscope.dashboards.callbacks import MAP_TABLE_NOTE, grid_view
from attnscope.dashboards.maps import (find_image, is_map_table, map_choices, map_view, maps_view, read_image,
                                       table_grid)
from attnscope.errors import AttnscopeError, InputError
from attnscope.probes.tokens import Span, TokenInfo
from attnscope.probes.trace import AttentionTrace, SiteRecord

GRID = (2, 3)  # latent grid of the planted diffusion trace: 6 query pixels
TEXT = ["<s>", "a", "red", "cat"]  # 4 text keys


def _planted_cross() -> torch.Tensor:
    """[1, 2, 6, 4]: head 0 uniform; head 1 puts 0.5 + q / 20 on key 2 ("red") and the rest on key 0."""
    probs = torch.full((1, 2, 6, 4), 0.25)
    probs[0, 1] = 0.0
    probs[0, 1, :, 2] = 0.5 + torch.arange(6) / 20
    probs[0, 1, :, 0] = 1 - probs[0, 1, :, 2]
    return probs


def _vlm_probs() -> torch.Tensor:
    """[1, 1, 7, 7] causal rows over [<s>, 4 image tokens, "what", "?"]: row q puts weight k + 1 on key k <= q."""
    weights = torch.tril(torch.arange(1.0, 8.0).expand(7, 7))
    return (weights / weights.sum(-1, keepdim=True))[None, None]


@pytest.fixture
def root(tmp_path):
    """results/sd (two-step cross + self trace, image.png, DAAM-like table), results/vlm, results/text, and an
    outside image reachable only through a symlink."""
    from PIL import Image

    res = tmp_path / "results"
    (res / "sd").mkdir(parents=True)
    recs = []
    for step in (0, 1):
        cross = _planted_cross() if step == 0 else _planted_cross().flip(-1)
        recs += [SiteRecord(site=attnscope.Site("unet.up.0", 0, "cross"), step=step, probs=cross, n_query=6,
                            n_key=4, meta={"grid": list(GRID)}),
                 SiteRecord(site=attnscope.Site("unet.up.0", 0, "self"), step=step,
                            probs=torch.softmax(torch.randn(1, 2, 6, 6), -1), n_query=6, n_key=6,
                            meta={"grid": list(GRID)})]
    AttentionTrace(recs, TokenInfo(strings=[TEXT], grid=GRID)).save(res / "sd" / "capture.safetensors")
    Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8)).save(res / "sd" / "image.png")
    rows = [{"analysis": "daam", "layer": -1, "head": -1, "metric": "heat", "value": float(10 * w + 3 * y + x + b),
             "batch": b, "word": word, "y": y, "x": x}
            for b in (0, 1) for w, word in enumerate(["red", "cat"]) for y in range(2) for x in range(3)]
    attnscope.ResultTable.from_records(rows).save(res / "sd" / "daam.parquet")
    (res / "vlm").mkdir()
    tokens = TokenInfo(strings=[["<s>", "<img>", "<img>", "<img>", "<img>", "what", "?"]],
                       spans=[Span("special", 0, 1), Span("image", 1, 5), Span("text", 5, 7)])
    tower = torch.softmax(torch.arange(25.0).reshape(1, 1, 5, 5) / 7, -1)  # [CLS] + 2 x 2 patches
    AttentionTrace([SiteRecord(site=attnscope.Site("text", 0), probs=_vlm_probs(), n_query=7, n_key=7),
                    SiteRecord(site=attnscope.Site("vision", 0), probs=tower, n_query=5, n_key=5)],
                   tokens).save(res / "vlm" / "trace.safetensors")
    (res / "text").mkdir()
    AttentionTrace([SiteRecord(site=attnscope.Site("text", 0), probs=torch.softmax(torch.randn(1, 1, 5, 5), -1),
                               n_query=5, n_key=5)], TokenInfo(strings=[list("abcde")])).save(
        res / "text" / "trace.safetensors")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(outside / "secret.png")
    (res / "vlm" / "image.png").symlink_to(outside / "secret.png")
    return ResultsRoot(res)


def _heat(fig):
    return next(np.asarray(d.z, dtype=np.float64) for d in fig.data if d.type == "heatmap")


def test_cross_attention_map_defaults_to_the_most_attended_token(root):
    fig, grid = map_view(root, "sd/capture.safetensors", "unet.up.0.L0.cross", 0, "L0H1", None)
    reference = _planted_cross()[0, 1, :, 2].reshape(GRID).numpy()  # key 2 has the largest mean column
    np.testing.assert_allclose(_heat(fig), reference, atol=1e-6)
    np.testing.assert_allclose(grid.values, reference, atol=1e-6)
    title = fig.layout.title.text
    assert "'red'" in title and "key position 2" in title and "over image.png" in title
    image, heat = fig.data
    assert image.type == "image" and image.source.startswith("data:image/png;base64,") and image.z is None
    assert (heat.dx, heat.dy) == (30 / 3, 20 / 2)  # the 2 x 3 map is stretched over the 20 x 30 image


def test_cross_attention_map_of_a_chosen_token_step_and_clicked_head(root):
    fig, _ = map_view(root, "sd/capture.safetensors", "unet.up.0.L0.cross", 0, None, (0, 1), token=0)
    np.testing.assert_allclose(_heat(fig), _planted_cross()[0, 1, :, 0].reshape(GRID).numpy(), atol=1e-6)
    fig, _ = map_view(root, "sd/capture.safetensors", "unet.up.0.L0.cross", 0, None, (0, 1), token=1, step=1)
    flipped = _planted_cross().flip(-1)  # step 1 holds the keys reversed: key 1 there = key 2 of step 0
    np.testing.assert_allclose(_heat(fig), flipped[0, 1, :, 1].reshape(GRID).numpy(), atol=1e-6)
    assert "step 1" in fig.layout.title.text
    fig, _ = map_view(root, "sd/capture.safetensors", "unet.up.0.L0.cross", 0, None, (0, 0), token=3)
    np.testing.assert_allclose(_heat(fig), np.full(GRID, 0.25), atol=1e-6)


def test_latent_self_attention_map_is_the_mean_received_per_pixel(root):
    fig, _ = map_view(root, "sd/capture.safetensors", "unet.up.0.L0.self", 0, "L0H0", None)
    probs = AttentionTrace.load(root.root / "sd" / "capture.safetensors").get(
        attnscope.Site("unet.up.0", 0, "self"), 0).probs[0, 0]
    np.testing.assert_allclose(_heat(fig), probs.mean(0).reshape(GRID).numpy(), atol=1e-6)


def test_vlm_map_is_the_query_row_over_the_image_tokens(root):
    probs = _vlm_probs()[0, 0]
    fig, _ = map_view(root, "vlm/trace.safetensors", None, 0, None, None)  # default: last token "?"
    np.testing.assert_allclose(_heat(fig), probs[6, 1:5].reshape(2, 2).numpy(), atol=1e-6)
    assert "'?'" in fig.layout.title.text
    fig, _ = map_view(root, "vlm/trace.safetensors", None, 0, None, None, token=5)
    np.testing.assert_allclose(_heat(fig), probs[5, 1:5].reshape(2, 2).numpy(), atol=1e-6)
    assert len(fig.data) == 1  # vlm/image.png leaves the results directory: not drawn
    fig, _ = map_view(root, "vlm/trace.safetensors", "vision.L0.self", 0, "L0H0", None)  # vision tower: [CLS] row
    tower = torch.softmax(torch.arange(25.0).reshape(5, 5) / 7, -1)
    np.testing.assert_allclose(_heat(fig), tower[0, 1:].reshape(2, 2).numpy(), atol=1e-6)
    assert map_choices(root, "vlm/trace.safetensors", "vision.L0.self", 0)[:3] == (True, "", [])


def test_map_choices_offer_tokens_steps_and_only_where_there_is_an_image(root):
    able, what, options, steps = map_choices(root, "sd/capture.safetensors", "unet.up.0.L0.cross", 0)
    assert able and what.startswith("key token") and steps == [0, 1]
    assert [o["value"] for o in options] == [0, 1, 2, 3] and options[2]["label"] == "2: red"
    able, what, options, _ = map_choices(root, "vlm/trace.safetensors", None, 0)
    assert able and what.startswith("query token") and [o["value"] for o in options] == [0, 5, 6]
    assert map_choices(root, "sd/capture.safetensors", "unet.up.0.L0.self", 0)[:3] == (True, "", [])
    assert map_choices(root, "text/trace.safetensors", None, 0) == (False, "", [], [])
    assert map_choices(root, "../outside/secret.png", None, 0) == (False, "", [], [])
    with pytest.raises(InputError, match="no image structure"):
        map_view(root, "text/trace.safetensors", None, 0, None, None)
    with pytest.raises(PathRefused):
        map_view(root, "../outside/x.safetensors", None, 0, None, None)


def test_images_are_found_next_to_the_file_and_only_inside_the_root(root, tmp_path):
    from PIL import Image

    assert find_image(root, "sd/capture.safetensors").name == "image.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root.root / "sd" / "capture.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root.root / "sd" / "image_1.png")
    assert find_image(root, "sd/capture.safetensors").name == "capture.png"  # the trace's own image first
    assert find_image(root, "sd/daam.parquet", 1, 2).name == "image_1.png"
    assert find_image(root, "sd/daam.parquet", 2, 3) is None  # no unindexed image for item 2 of 3
    assert find_image(root, "vlm/trace.safetensors") is None  # a symlink out of the root
    with pytest.raises(PathRefused):
        root.resolve("sd/image.png")  # images are not result files: only kind "image" asks for them
    assert read_image(root.root / "sd" / "image.png").shape == (20, 30, 3)
    Image.fromarray(np.zeros((1000, 1500, 3), dtype=np.uint8)).save(root.root / "sd" / "big.png")
    small = read_image(root.root / "sd" / "big.png").shape  # shrunk to 512 wide, aspect kept (to a pixel)
    assert small[1:] == (512, 3) and abs(small[0] - 1000 * 512 / 1500) < 1
    (root.root / "sd" / "image_1.png").write_bytes(b"not a png")
    with pytest.raises(AttnscopeError, match="not a readable image"):
        read_image(root.root / "sd" / "image_1.png")


def test_maps_card_shows_the_table_values_and_the_grid_a_note(root):
    df = pd.read_parquet(root.root / "sd" / "daam.parquet")
    for word, item in (("cat", 0), ("red", 1)):
        fig = maps_view(root, "sd/daam.parquet", word, item)
        rows = df[(df.word == word) & (df.batch == item)]
        expected = rows.pivot(index="y", columns="x", values="value").to_numpy()
        np.testing.assert_allclose(_heat(fig), expected)
        assert f"'{word}'" in fig.layout.title.text
        # image.png is drawn under item 0 only: item 1 of 2 would need image_1.png
        assert ("over image.png" in fig.layout.title.text) == (item == 0) and len(fig.data) == 2 - item
    assert is_map_table(df) and not is_map_table(df.drop(columns="word"))
    with pytest.raises(InputError, match="no map for this word"):
        table_grid(df, "dog", 0)
    note = grid_view(root, "sd/daam.parquet", None)
    assert note.layout.annotations[0].text == MAP_TABLE_NOTE and not note.data


def test_app_builds_with_the_map_components(root):
    client = create_app(root.root).server.test_client()
    layout = json.dumps(client.get("/_dash-layout").get_json())
    for component in ("map-token", "map-step", "maps-card", "maps-word", "maps-item", "maps-fig"):
        assert f'"{component}"' in layout


def test_pooled_pattern_of_latent_self_attention_has_no_text_labels(root):
    from attnscope.dashboards.callbacks import pattern_view

    fig, top = pattern_view(root, "sd/capture.safetensors", "unet.up.0.L0.self", 0, "L0H1", None, "auto")
    probs = AttentionTrace.load(root.root / "sd" / "capture.safetensors").get(
        attnscope.Site("unet.up.0", 0, "self"), 0).probs[0, 1]
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=np.float64), probs.numpy(), atol=1e-6)
    assert top[0][0] == int(probs.mean(0).argmax()) and top[0][1] not in TEXT  # pixels, not text tokens


@pytest.mark.parametrize("token, step, item", [("abc", None, 0), (None, "x", 0), (99, None, 0), (-1, None, 0),
                                              (None, None, "zz"), (None, None, 5)])
def test_forged_map_picker_values_raise_named_errors(root, token, step, item):
    with pytest.raises(AttnscopeError):
        map_view(root, "sd/capture.safetensors", "unet.up.0.L0.cross", item, None, (0, 1), token, step)
    if token is None and step is None:
        with pytest.raises(AttnscopeError):
            maps_view(root, "sd/daam.parquet", "cat", item)
