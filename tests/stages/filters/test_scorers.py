"""The filters' scorers (refforge.stages.filters.scorers): CLIP margins, DINOv2 best-of-N, DIRE and
the offline stand-ins. The model scorers run on the tiny random-initialised models of
refforge.testing.tiny_filters, saved to disk in the formats the scorers load in production."""

from __future__ import annotations

import doctest
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from refforge.optional import install_command
from refforge.stages.filters import scorers as scorers_module
from refforge.stages.filters.scorers import (
    ClipScorer,
    DinoScorer,
    DireScorer,
    best_of_n,
    clip_margin_image,
    clip_margin_text,
    make_scorer,
    masked_change,
    outside_change,
    seam_score,
)
from refforge.testing import tiny_filters


def _scene(seed: int, size=(64, 48)) -> Image.Image:
    """A textured image: smooth noise plus two coloured rectangles."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, size=(size[1] // 4 + 1, size[0] // 4 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    draw.rectangle((5, 5, 25, 20), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw.ellipse((30, 15, 55, 40), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def _noised(img: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    a = np.asarray(img, dtype=np.float64) + np.random.default_rng(seed).normal(0, sigma, (img.height, img.width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP
    threads competing with other processes made one tiny UNet pass ~50x slower (1 s instead of 20 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images():
    return [_scene(i) for i in range(5)]


def test_doctests():
    result = doctest.testmod(scorers_module)
    assert result.attempted > 0 and result.failed == 0


def test_module_imports_and_offline_functions_run_without_torch():
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "torchvision", "transformers", "open_clip", "diffusers"):
            sys.modules[name] = None  # makes any import of them fail
        import numpy as np
        from refforge.stages.filters import scorers as s
        a = np.zeros((6, 6, 3), np.uint8); m = np.zeros((6, 6), bool); m[1:3, 1:3] = True
        assert s.outside_change(a, a, m) == 0.0 and s.seam_score(a, a, m) == 1.0
        for name, opts in (("clip", dict(model="x", pretrained="y")), ("dinov2", dict(model="x")),
                           ("dire", dict(model="x"))):
            try:
                s.make_scorer(name, **opts)
            except ImportError as e:
                assert {install_command("models")!r} in str(e), e
            else:
                raise AssertionError(name)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_make_scorer_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown scorer 'blip'"):
        make_scorer("blip")


# ---------------------------------------------------------------------------------------------
# CLIP


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    name, ckpt = tiny_filters.save_tiny_clip(tmp_path_factory.mktemp("clip"))
    return name, ckpt


def _reference_clip(name, ckpt, images, texts):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    model.load_state_dict(torch.load(ckpt))
    model.eval()
    with torch.no_grad():
        v = model.encode_image(torch.stack([preprocess(im) for im in images]))
        t = model.encode_text(open_clip.get_tokenizer(name)(texts))
    return (v / v.norm(dim=-1, keepdim=True)).numpy(), (t / t.norm(dim=-1, keepdim=True)).numpy()


def test_clip_embeddings_match_open_clip_and_are_unit_norm(clip, images):
    scorer = make_scorer("clip", model=clip[0], pretrained=clip[1], batch_size=2)
    texts = ["a red box", "a blue ball", "the tree on the left"]
    img, txt = scorer.image_embeddings(images), scorer.text_embeddings(texts)
    ref_img, ref_txt = _reference_clip(*clip, images, texts)
    assert img.shape == (5, 16) and txt.shape == (3, 16) and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(img, ref_img, atol=1e-5)
    np.testing.assert_allclose(txt, ref_txt, atol=1e-5)
    np.testing.assert_allclose(scorer.pair_scores(images[:3], texts), np.sum(ref_img[:3] * ref_txt, 1), atol=1e-5)
    assert scorer.image_embeddings([]).shape == (0, 16) and scorer.text_embeddings([]).shape == (0, 16)


def test_clip_batching_equals_one_batch(clip, images):
    one = ClipScorer(clip[0], clip[1], batch_size=len(images))
    small = ClipScorer(clip[0], clip[1], batch_size=2)
    np.testing.assert_allclose(small.image_embeddings(images), one.image_embeddings(images), atol=1e-6)
    texts = [f"a photo of thing {i}" for i in range(5)]
    np.testing.assert_allclose(small.text_embeddings(texts), one.text_embeddings(texts), atol=1e-6)


def test_clip_text_embeddings_are_cached(clip):
    scorer = ClipScorer(clip[0], clip[1], batch_size=2)
    calls = []
    encode_text = scorer.model.encode_text
    scorer.model.encode_text = lambda tokens, *a, **k: calls.append(len(tokens)) or encode_text(tokens, *a, **k)
    first = scorer.text_embeddings(["a", "b", "a", "c"])
    assert calls == [2, 1]  # three distinct texts, two per batch
    np.testing.assert_array_equal(first[0], first[2])
    again = scorer.text_embeddings(["c", "b", "d"])
    assert calls == [2, 1, 1]  # only "d" is new
    np.testing.assert_array_equal(again[:2], first[[3, 1]])


def test_clip_refuses_random_weights(clip):
    with pytest.raises(ValueError, match="pretrained"):
        ClipScorer(clip[0], None)


def test_clip_margin_image_zero_for_unedited_nonzero_for_edited(clip, images):
    scorer = ClipScorer(clip[0], clip[1], batch_size=3)
    texts = ["the red box", "the ball", "a tree", "the thing", "the left one"]
    edited = [images[0], _noised(images[1], 40), images[2], images[4], images[3]]
    margin = clip_margin_image(scorer, images, edited, texts)
    assert margin.shape == (5,)
    assert margin[0] == 0.0 and margin[2] == 0.0  # exactly: an image equal to its original
    assert np.all(np.abs(margin[[1, 3, 4]]) > 1e-4)
    expected = scorer.pair_scores(images, texts) - scorer.pair_scores(edited, texts)
    np.testing.assert_allclose(margin, expected, atol=1e-6)
    with pytest.raises(ValueError, match="lengths differ"):
        clip_margin_image(scorer, images, edited[:2], texts)


def test_clip_margin_text_is_antisymmetric(clip, images):
    scorer = ClipScorer(clip[0], clip[1])
    pos = ["the red box", "the ball on the right", "a tree", "a dog", "the cup"]
    neg = ["the blue box", "the ball on the left", "a bush", "a dog", "the mug"]
    m = clip_margin_text(scorer, images, pos, neg)
    np.testing.assert_array_equal(clip_margin_text(scorer, images, neg, pos), -m)
    assert m[3] == 0.0  # same text both ways
    assert np.all(np.abs(m[[0, 1, 2, 4]]) > 1e-5)
    np.testing.assert_allclose(m, scorer.pair_scores(images, pos) - scorer.pair_scores(images, neg), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# DINOv2


@pytest.fixture(scope="module")
def dino_path(tmp_path_factory):
    return tiny_filters.save_tiny_dinov2(tmp_path_factory.mktemp("dino"))


def test_dino_embeddings_are_the_normalised_cls_token(dino_path, images):
    from transformers import AutoImageProcessor, Dinov2Model

    scorer = make_scorer("dinov2", model=dino_path, batch_size=2)
    emb = scorer.embeddings(images)
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    proc, model = AutoImageProcessor.from_pretrained(dino_path), Dinov2Model.from_pretrained(dino_path).eval()
    with torch.no_grad():
        out = model(**proc(images=images, return_tensors="pt"))
    cls = out.last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(emb, cls / np.linalg.norm(cls, axis=1, keepdims=True), atol=1e-5)


def test_dino_best_of_n_prefers_identical_then_less_noised(dino_path, images):
    scorer = DinoScorer(dino_path, batch_size=3)
    original = images[0]
    candidates = [_noised(original, 60, 1), images[3], original, _noised(original, 15, 2), _noised(original, 60, 3)]
    emb = scorer.embeddings([original] + candidates)
    sims, best = best_of_n(emb[0], emb[1:])
    assert best == 2
    assert sims[2] == pytest.approx(1.0, abs=1e-6)
    assert np.all(sims[[0, 1, 3, 4]] < sims[2] - 1e-4)
    assert sims[3] > max(sims[0], sims[4])  # light noise stays closer than heavy noise


def test_dino_batching_equals_one_batch(dino_path, images):
    np.testing.assert_allclose(DinoScorer(dino_path, batch_size=1).embeddings(images),
                               DinoScorer(dino_path, batch_size=5).embeddings(images), atol=1e-6)


def test_best_of_n_checks_shapes():
    with pytest.raises(ValueError, match="at least one"):
        best_of_n(np.ones(3), np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        best_of_n(np.ones(3), np.ones((2, 4)))


# ---------------------------------------------------------------------------------------------
# DIRE


@pytest.fixture(scope="module")
def pixel_path(tmp_path_factory):
    return tiny_filters.save_tiny_pixel_diffusion(tmp_path_factory.mktemp("pixel"))


@pytest.fixture(scope="module")
def latent_path(tmp_path_factory):
    return tiny_filters.save_tiny_latent_diffusion(tmp_path_factory.mktemp("latent"))


@pytest.fixture(scope="module")
def dire_ckpt(tmp_path_factory):
    return tiny_filters.save_tiny_dire_classifier(tmp_path_factory.mktemp("dire") / "model_epoch_latest.pth")


@pytest.fixture(scope="module")
def dire_images():
    return [_scene(10, (40, 30)), _scene(11, (32, 32)), Image.new("RGB", (20, 36), (120, 30, 200))]


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_dire_error_maps_have_the_image_size_and_are_deterministic(kind, pixel_path, latent_path, dire_images):
    path = pixel_path if kind == "pixel" else latent_path
    scorer = make_scorer("dire", model=path, steps=4, size=32, batch_size=2)
    assert scorer.kind == kind
    scores, maps = scorer.score(dire_images)
    assert scores.shape == (3,) and len(maps) == 3
    for im, m, s in zip(dire_images, maps, scores, strict=True):
        assert m.shape == (im.height, im.width) and m.dtype == np.float32
        assert 0.0 <= m.min() and m.max() <= 1.0 and m.max() > 0.0
        assert 0.0 < s < 1.0
    scores2, maps2 = scorer.score(dire_images)
    np.testing.assert_array_equal(scores2, scores)
    for a, b in zip(maps, maps2, strict=True):
        np.testing.assert_array_equal(a, b)
    one_by_one = DireScorer(path, steps=4, size=32, batch_size=1).score(dire_images)[0]
    np.testing.assert_allclose(one_by_one, scores, atol=1e-5)


def test_dire_inversion_round_trip_matches_a_hand_computation(pixel_path):
    """One DDIM step each way with the model's own noise: a check of the update formulas."""
    scorer = DireScorer(pixel_path, steps=1, size=32)
    t = scorer.timesteps[0]
    assert scorer.timesteps == [t]
    x = torch.linspace(-0.9, 0.9, 3 * 32 * 32).reshape(1, 3, 32, 32)
    with torch.inference_mode():
        eps0 = scorer.unet(x, torch.tensor([0])).sample
        a0, at = scorer.clean_alpha, float(scorer.alphas[t])
        x0 = ((x - (1 - a0) ** 0.5 * eps0) / a0 ** 0.5).clamp(-1, 1)  # the tiny scheduler clips
        eps0 = (x - a0 ** 0.5 * x0) / (1 - a0) ** 0.5 if a0 < 1 else eps0
        xt = at ** 0.5 * x0 + (1 - at) ** 0.5 * eps0
        torch.testing.assert_close(scorer._invert(x), xt)
        eps = scorer.unet(xt, torch.tensor([t])).sample
        x0b = ((xt - (1 - at) ** 0.5 * eps) / at ** 0.5).clamp(-1, 1)
        torch.testing.assert_close(scorer._reconstruct(xt), x0b * a0 ** 0.5 + (1 - a0) ** 0.5 *
                                   ((xt - at ** 0.5 * x0b) / (1 - at) ** 0.5), atol=1e-5, rtol=1e-5)


def test_dire_classifier_gives_probabilities(pixel_path, dire_ckpt, dire_images):
    plain = DireScorer(pixel_path, steps=3, size=32)
    judged = DireScorer(pixel_path, steps=3, size=32, classifier=dire_ckpt)
    s0, maps0 = plain.score(dire_images)
    s1, maps1 = judged.score(dire_images)
    assert np.all((s1 > 0) & (s1 < 1))
    assert not np.allclose(s0, s1)
    for a, b in zip(maps0, maps1, strict=True):
        np.testing.assert_array_equal(a, b)
    # the classifier is DIRE's resnet50 with the checkpoint's weights
    import torchvision

    net = torchvision.models.resnet50(weights=None, num_classes=1)
    net.load_state_dict(torch.load(dire_ckpt)["model"])
    for name, p in net.state_dict().items():
        torch.testing.assert_close(judged.classifier.state_dict()[name], p)


def test_dire_classifier_accepts_a_bare_or_dataparallel_state_dict(pixel_path, dire_ckpt, tmp_path, dire_images):
    state = torch.load(dire_ckpt)["model"]
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "dp.pth")
    ref = DireScorer(pixel_path, steps=2, size=32, classifier=dire_ckpt).score(dire_images[:1])[0]
    got = DireScorer(pixel_path, steps=2, size=32, classifier=str(tmp_path / "dp.pth")).score(dire_images[:1])[0]
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_dire_classifier_in_the_wrong_format_is_one_clear_error(pixel_path, tmp_path):
    import torchvision

    cases = {
        "resnet18.pth": {"model": torchvision.models.resnet18(weights=None, num_classes=1).state_dict()},
        "imagenet_head.pth": {"model": torchvision.models.resnet50(weights=None).state_dict()},
        "not_a_dict.pth": [1, 2, 3],
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "text.pth").write_text("hello")
    for name in [*cases, "text.pth"]:
        with pytest.raises(ValueError) as info:
            DireScorer(pixel_path, steps=1, size=32, classifier=str(tmp_path / name))
        msg = str(info.value)
        assert "\n" not in msg and "not a DIRE classifier checkpoint" in msg and name in msg, msg
    with pytest.raises(ValueError, match=r"wrong shapes for fc\.bias, fc\.weight"):
        DireScorer(pixel_path, steps=1, size=32, classifier=str(tmp_path / "imagenet_head.pth"))


def test_dire_uses_the_noise_half_of_a_learned_variance_unet(tmp_path, dire_images):
    path = tiny_filters.save_tiny_pixel_diffusion(tmp_path, learned_sigma=True)
    scorer = DireScorer(path, steps=2, size=32)
    x = torch.zeros(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(scorer._model(x, 5), scorer.unet(x, torch.tensor([5, 5])).sample[:, :3])
    scores, maps = scorer.score(dire_images)
    assert scores.shape == (3,) and all(0 <= m.min() and m.max() <= 1 for m in maps)


def test_dire_rejects_folders_it_cannot_use(tmp_path, latent_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        DireScorer(str(tmp_path))
    with pytest.raises(ValueError, match="multiple of 4"):
        DireScorer(latent_path, size=30)


# ---------------------------------------------------------------------------------------------
# offline stand-ins


def _edit(size=40, box=(10, 10, 25, 30), fill=(0, 0, 0), seed=0):
    rng = np.random.default_rng(seed)  # a smooth texture: upscaled noise, no sharp shapes
    low = rng.integers(60, 200, size=(size // 8 + 1, size // 8 + 1, 3)).astype(np.uint8)
    orig = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC))
    mask = np.zeros((size, size), bool)
    mask[box[1]:box[3], box[0]:box[2]] = True
    edited = orig.copy()
    edited[mask] = fill
    return orig, edited, mask


def test_outside_change_is_zero_when_only_the_mask_changed():
    orig, edited, mask = _edit()
    assert outside_change(orig, edited, mask) == 0.0
    assert masked_change(orig, edited, mask) > 0.2
    shifted = edited.copy()
    shifted[0, 0] = 255 - shifted[0, 0]
    assert outside_change(orig, shifted, mask) > 0.0
    # PIL images and a PIL mask give the same numbers
    assert outside_change(Image.fromarray(orig), Image.fromarray(shifted), Image.fromarray(mask)) == \
        outside_change(orig, shifted, mask)


def test_masked_change_is_zero_for_an_unchanged_image():
    orig, _, mask = _edit()
    assert masked_change(orig, orig, mask) == 0.0
    assert masked_change(orig, orig.copy(), np.zeros_like(mask)) == 0.0
    full = np.full((4, 4, 3), 255, np.uint8)
    assert masked_change(np.zeros((4, 4, 3), np.uint8), full, np.ones((4, 4), bool)) == 1.0


def test_seam_score_one_for_unedited_larger_for_a_pasted_flat_patch():
    orig, edited, mask = _edit(fill=(20, 200, 20))
    assert seam_score(orig, orig, mask) == pytest.approx(1.0)
    assert seam_score(orig, edited, mask) > 1.5
    # a blended edit (the patch fades in over the band) is less visible than a pasted one
    alpha = np.zeros(mask.shape)
    alpha[mask] = 1.0
    for _ in range(4):  # box blur of the mask
        alpha = (alpha + np.roll(alpha, 1, 0) + np.roll(alpha, -1, 0) + np.roll(alpha, 1, 1) + np.roll(alpha, -1, 1)) / 5
    blended = (orig * (1 - alpha[..., None]) + edited * alpha[..., None]).astype(np.uint8)
    assert 1.0 <= seam_score(orig, blended, mask) < seam_score(orig, edited, mask)
    assert seam_score(orig, edited, np.zeros_like(mask)) == 1.0


def test_offline_checks_shapes():
    orig, edited, mask = _edit()
    with pytest.raises(ValueError, match="mask shape"):
        outside_change(orig, edited, mask[:-1])
    with pytest.raises(ValueError, match="differ in shape"):
        masked_change(orig, edited[:-1], mask)
    with pytest.raises(ValueError, match="width"):
        seam_score(orig, edited, mask, width=0)


def test_preparing_the_next_batch_on_threads_changes_no_number(clip, dino_path, images):
    for make, call in ((lambda: ClipScorer(clip[0], clip[1], batch_size=2), "image_embeddings"),
                       (lambda: DinoScorer(dino_path, batch_size=2), "embeddings")):
        threaded, serial = make(), make()
        threaded.prep_workers, serial.prep_workers = 3, 1
        big = [im.resize((320, 240)) for im in images]  # large enough to be prepared on threads
        np.testing.assert_array_equal(getattr(threaded, call)(big), getattr(serial, call)(big))
