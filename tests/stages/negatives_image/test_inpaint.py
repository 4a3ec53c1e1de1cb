"""Inpainting backends: OpenCV removal / recolour on synthetic scenes, the diffusers backend on a tiny pipeline."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from refforge.stages.ingest.synthetic import generate_scene, remove_object, render, set_attribute
from refforge.stages.negatives_image.inpaint import (
    COLOUR_HSV,
    EMPTY_BOX,
    UNKNOWN_COLOUR,
    UNSUPPORTED,
    DiffusersInpainter,
    EditRequest,
    EditResult,
    Inpainter,
    OpenCVInpainter,
    box_mask,
    composite,
    fidelity,
    make_inpainter,
    working_size,
)
from refforge.testing.tiny_inpaint import save_tiny_sd_inpaint


def _scene(seed: int = 3):
    sc = generate_scene(seed)
    return sc.graph, sc.spec, render(sc.graph, sc.spec)


def _obj(graph, name: str):
    return next(o for o in graph.objects if o.name == name)


def _visible_region(graph, spec, object_id: str) -> np.ndarray:
    """The object's own visible pixels: where the render changes when it is removed."""
    before = np.asarray(render(graph, spec))
    after = np.asarray(render(*remove_object(graph, spec, object_id)))
    return np.any(before != after, axis=-1)


def _hue_mean(img: Image.Image, region: np.ndarray) -> float:
    hsv = cv2.cvtColor(np.asarray(img).astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)
    h = np.deg2rad(hsv[..., 0][region])
    return float(np.rad2deg(np.arctan2(np.sin(h).mean(), np.cos(h).mean())) % 360)


def _hue_dist(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


# ---------------------------------------------------------------------------------------------------
# numpy helpers
# ---------------------------------------------------------------------------------------------------


def test_box_mask_dilates_and_clips():
    m = box_mask((10, 8), (2.0, 3.0, 5.0, 4.0), margin=1)
    assert m.shape == (8, 10)
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (1, 5, 2, 4)
    assert m.sum() == 5 * 3
    clipped = box_mask((10, 8), (-3, -3, 2, 2), margin=2)
    assert clipped[:4, :4].all() and clipped.sum() == 16
    assert not box_mask((10, 8), (20, 20, 30, 30), margin=0).any()


def test_composite_is_bit_exact_outside():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
    m = np.zeros((6, 7), bool)
    m[1:3, 2:5] = True
    out = np.asarray(composite(a, b, m))
    assert np.array_equal(out[~m], np.asarray(a)[~m])
    assert np.array_equal(out[m], np.asarray(b)[m])
    with pytest.raises(ValueError):
        composite(a, b, np.zeros((5, 7), bool))


def test_fidelity_on_hand_made_arrays():
    original = np.zeros((2, 2, 3), np.uint8)
    truth = original.copy()
    truth[0, 0] = 255  # the true edit: one pixel turns white
    edited = original.copy()
    edited[0, 0] = (255, 255, 0)  # masked pixel: off by 255 in one of three channels
    edited[1, 1] = (51, 0, 0)  # one outside pixel changed by 51 in one channel
    mask = np.zeros((2, 2), bool)
    mask[0, 0] = True
    f = fidelity(original, edited, truth, mask)
    assert f["masked_error"] == pytest.approx(1 / 3)
    assert f["truth_masked_change"] == pytest.approx(1.0)
    assert f["outside_change"] == pytest.approx((51 / 255) / 9)  # 3 pixels x 3 channels outside
    assert f["outside_changed_frac"] == pytest.approx(1 / 3)
    perfect = fidelity(original, truth, truth, mask)
    assert perfect == {
        "masked_error": 0.0,
        "outside_change": 0.0,
        "outside_changed_frac": 0.0,
        "truth_masked_change": 1.0,
    }
    # PIL images work the same as arrays; an empty mask averages to 0
    assert (
        fidelity(Image.fromarray(original), Image.fromarray(edited), truth, np.zeros((2, 2), bool))[
            "masked_error"
        ]
        == 0.0
    )


def test_working_size_longer_side_and_multiples_of_8():
    assert working_size((512, 384), 64) == (64, 48)
    assert working_size((300, 500), 512) == (304, 512)
    assert working_size((80, 20), 64) == (64, 16)


# ---------------------------------------------------------------------------------------------------
# OpenCV backend
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["telea", "ns"])
@pytest.mark.parametrize("with_region", [True, False])
def test_opencv_remove_is_closer_to_ground_truth(method, with_region):
    graph, spec, img = _scene(3)
    target = _obj(graph, "cup")
    truth = render(*remove_object(graph, spec, target.id))
    region = _visible_region(graph, spec, target.id) if with_region else None
    inp = make_inpainter("offline", method=method)
    assert isinstance(inp, Inpainter) and inp.candidates == 1
    (res,) = inp.edit(
        [EditRequest(img, target.box, "remove", "", negative_prompt="cup", seed=7, region=region)]
    )
    assert isinstance(res, EditResult)
    assert res.seeds == [7] and res.model == f"opencv-{method}" and len(res.images) == 1
    out = res.images[0]
    assert out.size == img.size
    a, b = np.asarray(img), np.asarray(out)
    assert np.array_equal(a[~res.mask], b[~res.mask])  # bit-exact outside
    assert np.any(a[res.mask] != b[res.mask])
    if with_region:  # the tighter mask: the dilated region, inside the dilated box
        assert res.mask.sum() < box_mask(img.size, target.box, inp.margin).sum()
        assert res.mask[region].all()
    else:
        assert np.array_equal(res.mask, box_mask(img.size, target.box, inp.margin))
    f = fidelity(img, out, truth, res.mask)
    assert f["outside_change"] == 0.0 and f["outside_changed_frac"] == 0.0
    assert f["masked_error"] < 0.5 * f["truth_masked_change"], f


@pytest.mark.parametrize("with_region", [True, False])
def test_opencv_recolour_moves_hue_to_target(with_region):
    graph, spec, img = _scene(3)
    target = _obj(graph, "cup")  # purple
    region = _visible_region(graph, spec, target.id)
    truth = render(*set_attribute(graph, spec, target.id, "colour", "green"))
    inp = OpenCVInpainter()
    req = EditRequest(
        img,
        target.box,
        "change_attribute",
        "a green cup",
        word="green",
        family="colour",
        region=region if with_region else None,
    )
    (res,) = inp.edit([req])
    assert isinstance(res, EditResult) and res.model == "opencv-hsv-recolour"
    out = res.images[0]
    a, b = np.asarray(img), np.asarray(out)
    assert np.array_equal(a[~res.mask], b[~res.mask])
    green = COLOUR_HSV["green"][0]
    before, after = _hue_mean(img, region), _hue_mean(out, region)
    assert _hue_dist(before, green) > 100
    assert _hue_dist(after, green) < 15, (before, after)
    if with_region:
        assert np.array_equal(res.mask, region)
        f = fidelity(img, out, truth, region)
        assert f["masked_error"] < 0.5 * f["truth_masked_change"], f
    else:
        # grabCut on the rendered scene: it finds most of the cup and little outside its box
        seg, how = inp.object_region(img, target.box)
        assert how == "grabcut"
        assert np.array_equal(res.mask, seg)
        inside_box = box_mask(img.size, target.box, 0)
        assert (seg & region).sum() >= 0.8 * region.sum()
        assert (seg & ~inside_box).sum() == 0


def test_opencv_recolour_to_achromatic_and_ellipse_fallback():
    graph, spec, img = _scene(3)
    target = _obj(graph, "cup")
    region = _visible_region(graph, spec, target.id)
    (res,) = OpenCVInpainter().edit(
        [
            EditRequest(
                img,
                target.box,
                "change_attribute",
                "a white cup",
                word="white",
                family="colour",
                region=region,
            )
        ]
    )
    hsv = cv2.cvtColor(np.asarray(res.images[0]).astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)
    assert np.median(hsv[..., 1][region]) < 0.15 and np.median(hsv[..., 2][region]) > 0.85
    # a flat image gives grabCut nothing to separate: the inscribed ellipse is used
    flat = Image.new("RGB", (60, 40), (90, 120, 150))
    mask, how = OpenCVInpainter().object_region(flat, (10, 10, 30, 30))
    assert how == "ellipse"
    assert mask[20, 20] and not mask[10, 10] and not mask[5, 5] and mask.sum() < 400


def test_opencv_refusals():
    graph, spec, img = _scene(3)
    box = _obj(graph, "cup").box
    inp = OpenCVInpainter()
    assert inp.supports("remove") and inp.supports("change_attribute", "colour")
    assert not inp.supports("replace_category")
    assert not inp.supports("change_attribute", "pattern") and not inp.supports("change_attribute", "size")
    reqs = [
        EditRequest(img, box, "replace_category", "a bowl", word="bowl"),
        EditRequest(img, box, "change_attribute", "a striped cup", word="striped", family="pattern"),
        EditRequest(img, box, "change_attribute", "a chartreusey cup", word="chartreusey", family="colour"),
        EditRequest(img, (900, 900, 950, 950), "remove", ""),
        EditRequest(img, box, "change_attribute", "a Light Blue cup", word="Light Blue", family="colour"),
    ]
    out = inp.edit(reqs)
    assert out[:4] == [UNSUPPORTED, UNSUPPORTED, UNKNOWN_COLOUR, EMPTY_BOX]
    assert isinstance(out[4], EditResult)
    with pytest.raises(ValueError):
        make_inpainter("nope")


def test_opencv_is_deterministic():
    graph, spec, img = _scene(5)
    o = graph.objects[0]
    reqs = [
        EditRequest(img, o.box, "remove", ""),
        EditRequest(img, o.box, "change_attribute", "", word="red", family="colour"),
    ]
    a = OpenCVInpainter().edit(reqs)
    b = OpenCVInpainter().edit(reqs)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0]))
        assert np.array_equal(x.mask, y.mask)


# ---------------------------------------------------------------------------------------------------
# diffusers backend on a tiny random pipeline
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_sd_inpaint(tmp_path_factory.mktemp("tiny_sd_inpaint"))


def _count_calls(inp: DiffusersInpainter) -> list[dict]:
    calls: list[dict] = []
    real = inp.pipeline

    def wrapped(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    inp.pipeline = wrapped
    return calls


def _requests():
    rng = np.random.default_rng(1)
    a = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))  # 64x48 -> works at 64x48
    b = Image.fromarray(rng.integers(0, 256, (70, 40, 3), dtype=np.uint8))  # 40x70 -> works at 40x64
    return [
        EditRequest(a, (10, 8, 30, 30), "remove", "", negative_prompt="cup", seed=100),
        EditRequest(
            b, (5, 20, 25, 50), "replace_category", "a bowl", negative_prompt="cup", word="bowl", seed=200
        ),
        EditRequest(
            a, (30, 10, 50, 40), "change_attribute", "a red cup", word="red", family="colour", seed=300
        ),
    ]


def test_tiny_pipeline_loads_through_the_auto_pipeline(tiny_model):
    import diffusers

    pipe = diffusers.AutoPipelineForInpainting.from_pretrained(tiny_model)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    assert pipe.unet.config.in_channels == 9 and pipe.safety_checker is None
    # the real CLIP vocabulary: "a blue cup" tokenizes as in OpenAI CLIP
    assert pipe.tokenizer("a blue cup").input_ids == [49406, 320, 1746, 1937, 49407]


def test_diffusers_batches_candidates_and_composites(tiny_model):
    inp = make_inpainter("diffusers", model=tiny_model, candidates=2, steps=2, size=64, batch_size=2)
    assert isinstance(inp, Inpainter) and inp.candidates == 2
    calls = _count_calls(inp)
    reqs = _requests()
    out = inp.edit(reqs)
    # size groups: 64x48 (edits 0 and 2) and 40x64 (edit 1): one call each with batch_size 2
    assert len(calls) == math.ceil(2 / 2) + math.ceil(1 / 2)
    assert sorted((c["width"], c["height"], len(c["generator"])) for c in calls) == [(40, 64, 2), (64, 48, 4)]
    for req, res in zip(reqs, out, strict=True):
        assert isinstance(res, EditResult)
        assert res.model == tiny_model and res.seeds == [req.seed, req.seed + 1]
        assert len(res.images) == 2
        assert np.array_equal(res.mask, box_mask(req.image.size, req.box, inp.margin))
        orig = np.asarray(req.image)
        for im in res.images:
            assert im.size == req.image.size
            arr = np.asarray(im)
            assert np.array_equal(arr[~res.mask], orig[~res.mask])  # exactly zero change outside
            assert np.any(arr[res.mask] != orig[res.mask])
        assert not np.array_equal(np.asarray(res.images[0]), np.asarray(res.images[1]))

    # batch_size 1: one call per edit
    calls.clear()
    inp.batch_size = 1
    again = inp.edit(reqs)
    assert len(calls) == 3
    # same seeds -> the same pixels again, even with another batching (each candidate is its own row)
    for a, b in zip(out, again, strict=True):
        for x, y in zip(a.images, b.images, strict=True):
            d = np.abs(np.asarray(x).astype(int) - np.asarray(y).astype(int))
            assert d.max() <= 1 and (d > 0).mean() < 0.01

    # other seeds -> other pixels
    inp.batch_size = 2
    moved = inp.edit([EditRequest(**{**r.__dict__, "seed": r.seed + 50}) for r in reqs])
    for a, b in zip(out, moved, strict=True):
        assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    rerun = inp.edit(reqs)
    for a, b in zip(out, rerun, strict=True):
        for x, y in zip(a.images, b.images, strict=True):
            assert np.array_equal(np.asarray(x), np.asarray(y))


def test_diffusers_generator_order_and_expand_false(tiny_model):
    inp = DiffusersInpainter(tiny_model, candidates=2, steps=2, size=64, batch_size=4, expand=False)
    calls = _count_calls(inp)
    reqs = _requests()[::2]  # the two 64x48 edits
    out = inp.edit(reqs)
    (call,) = calls
    assert call["num_images_per_prompt"] == 2 and len(call["prompt"]) == 2
    # generators in output order: edit-major, seed + j
    seeds = [g.initial_seed() for g in call["generator"]]
    assert seeds == [100, 101, 300, 301]
    # the first edit (generator[0] also samples its masked-image latent) equals the expanded run
    ref = DiffusersInpainter(tiny_model, candidates=2, steps=2, size=64).edit(reqs)
    assert np.array_equal(np.asarray(out[0].images[0]), np.asarray(ref[0].images[0]))


def test_diffusers_prompts_and_refusals(tiny_model):
    inp = DiffusersInpainter(tiny_model, candidates=1, steps=1, size=64, prompt_style="powerpaint")
    calls = _count_calls(inp)
    reqs = _requests()
    size_edit = EditRequest(
        reqs[0].image, reqs[0].box, "change_attribute", "a big cup", word="large", family="size"
    )
    out = inp.edit([reqs[0], size_edit, EditRequest(reqs[0].image, (200, 200, 300, 300), "remove", "")])
    assert out[1] == UNSUPPORTED and out[2] == EMPTY_BOX and isinstance(out[0], EditResult)
    (call,) = calls
    assert call["prompt"] == ["empty scene blur"]
    assert call["negative_prompt"] == ["cup, worst quality, low quality, normal quality, bad quality, blurry"]
    assert inp.supports("replace_category") and inp.supports("change_attribute", "material")
    assert not inp.supports("change_attribute", "size") and not inp.supports("recolour")
    plain = DiffusersInpainter(tiny_model, candidates=1)
    assert plain.prompts(reqs[1]) == ("a bowl", "cup")
    assert str(plain.torch_dtype()) == "torch.float32"
    assert str(DiffusersInpainter(tiny_model, device="cuda").torch_dtype()) == "torch.float16"
    assert str(DiffusersInpainter(tiny_model, dtype="bf16").torch_dtype()) == "torch.bfloat16"
