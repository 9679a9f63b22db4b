"""The shapes dataset: masks are exactly each object's drawn pixels, captions and VQA answers agree with the scene
(read back from the pixels, not from the generator's bookkeeping), grids downsample masks correctly, seeding."""

import numpy as np
import pytest
import torch

from attnscope.datasets import PromptSuite
from attnscope.datasets.shapes import (ANSWERS, COLORS, ShapesScene, make_scene, patch_masks, scene_of, shape_mask,
                                       shapes_scenes, shapes_vqa, to_tensor)
from attnscope.errors import InputError

SCENES = shapes_scenes(200, seed=11)


def _colour_pixels(scene: ShapesScene, color: str) -> np.ndarray:
    return (scene.image == np.array(COLORS[color], dtype=np.uint8)).all(-1)


def _read_objects(scene: ShapesScene) -> dict[str, dict[str, str]]:
    """Independent reading of the image: per coloured blob, its half and its shape from area/corner geometry."""
    out = {}
    for color in COLORS:
        pix = _colour_pixels(scene, color)
        if not pix.any():
            continue
        rows, cols = np.nonzero(pix)
        r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
        box = pix[r0:r1 + 1, c0:c1 + 1]
        fill = box.mean()
        top_row = box[0].mean()
        shape = "square" if fill == 1.0 else "triangle" if top_row < 0.5 and fill < 0.7 else "circle"
        position = "left" if c1 < scene.image.shape[1] // 2 else "right"
        assert c0 >= scene.image.shape[1] // 2 or c1 < scene.image.shape[1] // 2, "object crosses the midline"
        out[color] = {"shape": shape, "position": position}
    return out


def test_masks_are_exactly_the_pixels_of_each_objects_colour():
    for scene in SCENES:
        assert scene.masks.shape == (len(scene.objects), 16, 16)
        for obj, mask in zip(scene.objects, scene.masks):
            np.testing.assert_array_equal(mask, _colour_pixels(scene, obj.color))
            assert mask.sum() >= 5
        covered = scene.masks.any(0)
        assert (scene.image[~covered] == 0).all()  # nothing drawn outside the masks


def test_scene_composition_rules():
    counts = {1: 0, 2: 0}
    for scene in SCENES:
        counts[len(scene.objects)] += 1
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a.color != b.color and a.shape != b.shape and a.position != b.position
            assert not (scene.masks[0] & scene.masks[1]).any()
    assert counts[1] > 40 and counts[2] > 40


def test_captions_match_the_pixels():
    for scene in SCENES:
        seen = _read_objects(scene)
        words = scene.caption.split()
        assert len(words) == 3 * len(scene.objects)
        triples = {(words[i], words[i + 1], words[i + 2]) for i in range(0, len(words), 3)}
        assert triples == {(c, seen[c]["shape"], seen[c]["position"]) for c in seen}


def test_vqa_answers_match_the_pixels():
    for scene in SCENES:
        seen = _read_objects(scene)
        by_shape = {v["shape"]: c for c, v in seen.items()}
        by_pos = {v["position"]: c for c, v in seen.items()}
        assert len(scene.questions) == 4 * len(scene.objects)
        for q in scene.questions:
            words = q.question.split()
            if q.kind == "color_of_shape":
                assert q.answer == by_shape[words[4]]
            elif q.kind == "shape_of_position":
                assert q.answer == seen[by_pos[words[3]]]["shape"]
            elif q.kind == "color_of_position":
                assert q.answer == by_pos[words[3]]
            else:
                assert q.answer == seen[by_shape[words[3]]]["position"]
            target = scene.objects[q.target]  # the object the question is about
            assert words[-2] in (target.shape, target.position)


def test_seeding_is_deterministic_and_seeds_differ():
    a, b = shapes_scenes(20, seed=5), shapes_scenes(20, seed=5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.image, y.image)
        assert x.caption == y.caption and x.questions == y.questions
    other = shapes_scenes(20, seed=6)
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, other))
    np.testing.assert_array_equal(make_scene(5, 13).image, shapes_scenes(14, seed=5)[13].image)


def test_vqa_suite_round_trips_and_redraws_its_scenes():
    suite = shapes_vqa(64, seed=3)
    assert PromptSuite.from_json(suite.to_json()) == suite
    assert {it.metadata["kind"] for it in suite} == {"color_of_shape", "shape_of_position", "color_of_position",
                                                      "position_of_shape"}
    for item in suite:
        scene = scene_of(item)
        match = [q for q in scene.questions if q.question == item.text]
        assert match and match[0].answer == item.answer_text == ANSWERS[item.label]
        assert item.metadata["caption"] == scene.caption


@pytest.mark.parametrize("grid", [4, 8, (2, 4)])
def test_patch_masks_against_a_loop_reference(grid):
    scene = SCENES[3]
    got = patch_masks(scene.masks, grid)
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    ph, pw = 16 // gh, 16 // gw
    for o in range(len(scene.objects)):
        for i in range(gh):
            for j in range(gw):
                cell = scene.masks[o, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
                assert got[o, i, j].item() == pytest.approx(cell.sum() / cell.size)
    torch.testing.assert_close(got.sum(dim=(1, 2)) * ph * pw, torch.tensor(scene.masks.sum(axis=(1, 2))).float())


def test_shape_geometry_and_errors():
    sq, circ, tri = (shape_mask(s, (2, 3, 7), 16) for s in ("square", "circle", "triangle"))
    assert sq.sum() == 49 and sq[2:9, 3:10].all()
    assert circ.sum() < sq.sum() and not circ[2, 3] and circ[5, 6]  # corners cut, centre filled
    assert tri[8, 3:10].all() and tri[2].sum() <= 1  # full base row, apex at the top
    with pytest.raises(InputError):
        shape_mask("hexagon", (0, 0, 5), 16)
    with pytest.raises(InputError):
        patch_masks(SCENES[0].masks, 5)
    with pytest.raises(InputError):
        make_scene(0, 0, image_size=7)


def test_to_tensor_range():
    x = to_tensor(SCENES[0].image)
    assert x.shape == (1, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0, :, SCENES[0].masks[0]].T, torch.tensor(SCENES[0].objects[0].rgb / 127.5 - 1).float())
