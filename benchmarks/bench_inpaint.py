"""Image negatives and their filters: images per second of refforge's code beside the bare model call.

Every comparison runs in this process, on the same batch, with the same loaded model object on both
sides (the bare side calls the model refforge loaded, or one loaded exactly as refforge loads it), after
one warm-up call of each path; the median of ``--repeats`` timed calls is reported. Never asserted:
the table is the result.

1. Inpainting (``--images`` edits of ``--image-size`` images, ``--candidates`` per edit, ``--batch`` edits
   per call, ``--steps`` steps at working size ``--size``):
   * bare: ``AutoPipelineForInpainting`` loaded as :class:`DiffusersInpainter` loads it, called directly on
     the prepared batch (images and masks already resized to the working size, prompts, generators):
     ``num_images_per_prompt = candidates`` (the natural batched call), and "bare, expanded": the exact
     rows refforge passes (each candidate its own row, ``num_images_per_prompt = 1``);
   * refforge: ``DiffusersInpainter.edit()`` on EditRequests of the same images and boxes (it adds the
     resizing, the per-candidate expansion of its docstring, resizing back and compositing), with
     ``expand=True`` (the default) and ``expand=False``;
   * the OpenCV backend alone: removal (``cv2.inpaint``) and colour change (grabCut + HSV recolour).
2. Filters, on refforge's inpainting outputs (edited images, their originals, one text per edit):
   * CLIP: bare ``encode_image`` / ``encode_text`` on preprocessed, tokenised, distinct inputs against
     ``ClipScorer.pair_scores`` and ``clip_margin_image`` (the text cache cleared before each call);
   * DINOv2: bare ``Dinov2Model`` forward on processed pixels against ``DinoScorer.embeddings`` (the
     candidates, then the originals, as the stage calls it);
   * DIRE: bare UNet passes (2 x steps per batch; the VAE encode/decode of a latent model, the classifier
     when given) on the prepared tensor against ``DireScorer.score``;
   * the offline measures (outside_change, masked_change, seam): images/s.
   The unit is edited images scored per second on both sides.
3. The stages end to end (skipped with ``--no-build``): a synthetic build (``--build-images`` images of
   ``--image-size``, one edit per image, ``remove`` and ``replace_category``) with ``[negatives_image]
   inpainter = "diffusers"`` on the same pipeline and ``[filters]`` running all six filters with the same
   models; each stage's wall seconds from the run record (``stages.<name>.wall_seconds``, as in
   ``runs/<id>.json``) beside the time the bare model would need for the same number of images (from 1 and
   2), and the time spent inside the model calls during the stage (instrumented in this process: the
   runner is one worker thread).

Models: with no paths, tiny random ones are built in a temporary folder (refforge.testing.tiny_inpaint,
refforge.testing.tiny_filters). They exercise every code path but are so small that preprocessing and
Python overhead weigh far more against them than against real models: ratios measured with them bound
the overhead from above. Real models on a GPU (the issue's target: the stage at >= 70% of the bare
model's batched throughput):

    .venv/bin/python benchmarks/bench_inpaint.py --device cuda --inpaint-model SD15_INPAINT_DIR \\
        --clip-model ViT-L-14 --clip-pretrained OPENCLIP_VIT_L14.bin --dinov2-model DINOV2_BASE_DIR \\
        --dire-model DIRE_DIFFUSION_DIR --size 512 --steps 20 --batch 4 --candidates 4 --images 16 \\
        --image-size 640x480 --filter-batch 32 --dire-steps 20 --dire-size 256 --build-images 16

Threads: torch's intra-op threads are set to ``--threads`` (default 1). On a shared 2-core machine torch's
default (one per core) slows these small models by up to ~50x as the threads wait for each other.

    .venv/bin/python benchmarks/bench_inpaint.py [--repeats 3] [--no-build]   (about 1-2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from refforge.stages.filters import scorers as S  # noqa: E402
from refforge.stages.negatives_image.inpaint import (  # noqa: E402
    DiffusersInpainter,
    EditRequest,
    OpenCVInpainter,
    box_mask,
    working_size,
)

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
SHAPES = ("cup", "ball", "box", "book", "lamp", "plate")


# ---------------------------------------------------------------------------------------------------
# helpers


def machine(device: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?") \
        if Path("/proc/cpuinfo").exists() else platform.processor() or "?"
    import torch

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else "no GPU used"
    return (f"{os.cpu_count()} cores ({cpu}, {platform.machine()}), {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)")


def make_images(n: int, width: int, height: int, seed: int = 0) -> list[tuple[Image.Image, tuple, str, str]]:
    """``n`` scenes: a gradient background with a few filled shapes; returns (image, box of the edited
    object, its colour, its name) per scene."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:height, 0:width]
        base = rng.integers(60, 200, 3)
        img = np.clip(base[None, None, :] + (xx[..., None] * 40 / width) - (yy[..., None] * 30 / height), 0, 255)
        img = np.ascontiguousarray(img.astype(np.uint8))
        boxes = []
        for _ in range(3):
            w, h = int(rng.integers(width // 6, width // 3)), int(rng.integers(height // 6, height // 3))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), colour, thickness=-1)
            else:
                cv2.ellipse(img, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, colour, thickness=-1)
            boxes.append((float(x), float(y), float(x + w), float(y + h)))
        noise = rng.normal(0, 6, img.shape)
        img = np.clip(img + noise, 0, 255).astype(np.uint8)
        out.append((Image.fromarray(img, "RGB"), boxes[i % 3], COLOURS[i % len(COLOURS)], SHAPES[i % len(SHAPES)]))
    return out


class Timer:
    def __init__(self, device: str, repeats: int) -> None:
        import torch

        self.torch, self.repeats = torch, repeats
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def median(self, fn: Callable[[Any], Any], setup: Callable[[], Any] = lambda: None) -> tuple[float, Any]:
        """Median seconds of ``fn(setup())`` over ``repeats`` calls after one warm-up call (``setup``
        untimed); returns it with the last call's result."""
        times, result = [], None
        for r in range(self.repeats + 1):
            arg = setup()
            self.sync()
            t0 = time.perf_counter()
            result = fn(arg)
            self.sync()
            if r:
                times.append(time.perf_counter() - t0)
        return statistics.median(times), result


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, int, float | None]] = []
        self.rates: dict[str, float] = {}

    def add(self, group: str, side: str, seconds: float, images: int, baseline: str | None = None) -> float:
        rate = images / seconds if seconds > 0 else float("inf")
        self.rates[f"{group}/{side}"] = rate
        ratio = rate / self.rates[f"{group}/{baseline}"] if baseline else None
        self.rows.append((group, side, seconds, images, ratio))
        return rate

    def print(self) -> None:
        print(f"\n{'what':<16} {'side':<44} {'seconds':>9} {'images':>7} {'images/s':>10} {'vs bare':>8}")
        for group, side, sec, n, ratio in self.rows:
            print(f"{group:<16} {side:<44} {sec:>9.4f} {n:>7} {n / sec:>10.1f} "
                  f"{'' if ratio is None else f'{ratio:>7.1%}':>8}")


# ---------------------------------------------------------------------------------------------------
# 1. inpainting


def load_bare_pipeline(path: str, device: str, dtype):
    """``AutoPipelineForInpainting`` loaded as :attr:`DiffusersInpainter.pipeline` loads it."""
    import diffusers

    deprecation = importlib.import_module("diffusers.utils.deprecation_utils")
    key = "dtype" if hasattr(deprecation, "_resolve_dtype") else "torch_dtype"
    pipe = diffusers.AutoPipelineForInpainting.from_pretrained(path, **{key: dtype}).to(device)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    return pipe


def bench_inpainting(args, model: str, scenes, timer: Timer, table: Table) -> dict[str, Any]:
    import torch

    n, cand, b = args.images, args.candidates, args.batch
    inp = DiffusersInpainter(model, device=args.device, dtype=args.dtype, candidates=cand, steps=args.steps,
                             size=args.size, batch_size=b, margin=args.margin)
    pipe = load_bare_pipeline(model, args.device, inp.torch_dtype())
    inp.pipeline = pipe  # one model object for both sides
    flat = DiffusersInpainter(model, device=args.device, dtype=args.dtype, candidates=cand, steps=args.steps,
                              size=args.size, batch_size=b, margin=args.margin, expand=False)
    flat.pipeline = pipe
    requests = [EditRequest(image=im, box=box, kind="replace_category", prompt=f"a {name}",
                            negative_prompt=SHAPES[(i + 1) % len(SHAPES)], word=name, seed=1000 + i)
                for i, (im, box, _c, name) in enumerate(scenes[:n])]
    wsize = working_size(scenes[0][0].size, args.size)
    images = [r.image.convert("RGB").resize(wsize, Image.Resampling.LANCZOS) for r in requests]
    masks = [Image.fromarray(box_mask(r.image.size, r.box, args.margin).astype(np.uint8) * 255, "L")
             .resize(wsize, Image.Resampling.NEAREST) for r in requests]
    common = {"num_inference_steps": args.steps, "guidance_scale": 7.5, "strength": 1.0,
              "width": wsize[0], "height": wsize[1], "output_type": "pil"}
    gen_device = args.device if args.device != "mps" else "cpu"

    def prepared(expanded: bool) -> Callable[[], list[dict]]:
        def setup() -> list[dict]:
            calls = []
            for s in range(0, n, b):
                idx = range(s, min(n, s + b))
                rep = cand if expanded else 1
                calls.append({
                    "prompt": [requests[i].prompt for i in idx for _ in range(rep)],
                    "negative_prompt": [requests[i].negative_prompt for i in idx for _ in range(rep)],
                    "image": [images[i] for i in idx for _ in range(rep)],
                    "mask_image": [masks[i] for i in idx for _ in range(rep)],
                    "num_images_per_prompt": 1 if expanded else cand,
                    "generator": [torch.Generator(gen_device).manual_seed(requests[i].seed + j)
                                  for i in idx for j in range(cand)],
                    **common})
            return calls
        return setup

    def bare(calls: list[dict]) -> list:
        out = []
        with torch.inference_mode():
            for kw in calls:
                out += pipe(**kw).images
        return out

    total = n * cand
    sec, out = timer.median(bare, prepared(False))
    assert len(out) == total
    table.add("inpaint", "bare pipeline (num_images_per_prompt=N)", sec, total)
    sec, out = timer.median(bare, prepared(True))
    assert len(out) == total
    table.add("inpaint", "bare pipeline, expanded rows (refforge's)", sec, total, "bare pipeline (num_images_per_prompt=N)")
    sec, results = timer.median(lambda _: inp.edit(requests))
    assert sum(len(r.images) for r in results) == total
    table.add("inpaint", "DiffusersInpainter.edit (expand=True)", sec, total, "bare pipeline (num_images_per_prompt=N)")
    sec, res_flat = timer.median(lambda _: flat.edit(requests))
    assert sum(len(r.images) for r in res_flat) == total
    table.add("inpaint", "DiffusersInpainter.edit (expand=False)", sec, total, "bare pipeline (num_images_per_prompt=N)")

    # the OpenCV backend on the same images (one candidate per edit)
    cvi = OpenCVInpainter()
    remove = [EditRequest(image=im, box=box, kind="remove", prompt="", seed=i)
              for i, (im, box, _c, _n) in enumerate(scenes[:n])]
    recolour = [EditRequest(image=im, box=box, kind="change_attribute", prompt=f"a {c} object", word=c,
                            family="colour", seed=i) for i, (im, box, c, _n) in enumerate(scenes[:n])]
    sec, _ = timer.median(lambda _: cvi.edit(remove))
    table.add("opencv", "remove (cv2.inpaint telea)", sec, n)
    sec, _ = timer.median(lambda _: cvi.edit(recolour))
    table.add("opencv", "recolour (grabCut + HSV)", sec, n)
    return {"requests": requests, "results": results, "pipeline": pipe}


# ---------------------------------------------------------------------------------------------------
# 2. filters


def bench_filters(args, models: dict[str, Any], inpainted: dict[str, Any], timer: Timer, table: Table) -> None:
    import torch

    requests, results = inpainted["requests"], inpainted["results"]
    originals = [r.image for r in requests]
    edited = [im for res in results for im in res.images]
    owner = [i for i, res in enumerate(results) for _ in res.images]
    orig_rep = [originals[i] for i in owner]
    texts = [f"the {scene_colour} {requests[i].word}" for i in owner
             for scene_colour in [COLOURS[i % len(COLOURS)]]]
    distinct_texts = list(dict.fromkeys(texts))
    m = len(edited)
    fb = args.filter_batch

    # CLIP
    clip = S.ClipScorer(models["clip_model"], models["clip_pretrained"], device=args.device, batch_size=fb,
                        dtype=args.dtype)

    def clip_bare(pixels, tokens):
        with torch.inference_mode():
            for s in range(0, len(pixels), fb):
                clip.model.encode_image(pixels[s:s + fb]).float().cpu()
            for s in range(0, len(tokens), fb):
                clip.model.encode_text(tokens[s:s + fb]).float().cpu()

    pix_edited = torch.stack([clip.preprocess(im) for im in edited]).to(args.device, clip.dtype)
    pix_both = torch.stack([clip.preprocess(im) for im in originals + edited]).to(args.device, clip.dtype)
    tokens = clip.tokenizer(distinct_texts).to(args.device)

    def fresh(call):
        def run(_):
            clip._text_cache.clear()  # every call encodes its texts, as the first call of a stage does
            return call()
        return run

    sec, _ = timer.median(lambda _: clip_bare(pix_edited, tokens))
    table.add("clip", "bare encode_image + encode_text", sec, m)
    sec, _ = timer.median(fresh(lambda: clip.pair_scores(edited, texts)))
    table.add("clip", "ClipScorer.pair_scores", sec, m, "bare encode_image + encode_text")
    sec, _ = timer.median(lambda _: clip_bare(pix_both, tokens))
    table.add("clip margin", "bare encode_image (originals+edited) + text", sec, m)
    sec, _ = timer.median(fresh(lambda: S.clip_margin_image(clip, orig_rep, edited, texts)))
    table.add("clip margin", "clip_margin_image", sec, m, "bare encode_image (originals+edited) + text")

    # DINOv2
    dino = S.DinoScorer(models["dinov2_model"], device=args.device, batch_size=fb, dtype=args.dtype)
    dpix = dino.processor(images=originals + edited, return_tensors="pt")["pixel_values"].to(args.device, dino.dtype)

    def dino_bare(_):
        with torch.inference_mode():
            for s in range(0, len(dpix), fb):
                dino.model(pixel_values=dpix[s:s + fb]).pooler_output.float().cpu()

    sec, _ = timer.median(dino_bare)
    table.add("dinov2", "bare Dinov2Model forward (originals+edited)", sec, m)
    sec, _ = timer.median(lambda _: (dino.embeddings(edited), dino.embeddings(originals)))
    table.add("dinov2", "DinoScorer.embeddings (candidates, originals)", sec, m, "bare Dinov2Model forward (originals+edited)")

    # DIRE
    dire = S.DireScorer(models["dire_model"], device=args.device, steps=args.dire_steps, size=args.dire_size,
                        classifier=models.get("dire_classifier"), batch_size=fb, dtype=args.dtype)
    x_all = dire._pixels(_rgb_list(edited))
    x224 = torch.zeros((min(fb, m), 3, 224, 224), device=args.device, dtype=dire.dtype)

    def dire_bare(_):
        with torch.inference_mode():
            for s in range(0, m, fb):
                x = x_all[s:s + fb]
                if dire.vae is not None:
                    x = dire.vae.encode(x).latent_dist.mean
                for t in dire.timesteps + dire.timesteps[::-1]:  # inversion up, reconstruction down
                    x = dire._model(x, t)
                if dire.vae is not None:
                    x = dire.vae.decode(x).sample
                if dire.classifier is not None:
                    dire.classifier(x224[:len(x)]).float().cpu()
                x.float().cpu()

    sec, _ = timer.median(dire_bare)
    table.add("dire", f"bare UNet passes (2 x {args.dire_steps} steps)", sec, m)
    sec, _ = timer.median(lambda _: dire.score(edited))
    table.add("dire", "DireScorer.score", sec, m, f"bare UNet passes (2 x {args.dire_steps} steps)")

    # offline measures (the stage passes PIL images and a bool mask)
    items = [(originals[i], im, results[i].mask) for i, im in zip(owner, edited, strict=True)]
    for name, fn in (("outside_change", S.outside_change), ("masked_change", S.masked_change),
                     ("seam", S.seam_score)):
        sec, _ = timer.median(lambda _, fn=fn: [fn(o, e, mk) for o, e, mk in items])
        table.add("offline", name, sec, m)


def _rgb_list(images):
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


# ---------------------------------------------------------------------------------------------------
# 2b. refforge's own CPU work per image at real input sizes (the models stubbed out)


class _StubPipeline:
    """Answers an inpainting call at once with ready images of the working size (no model)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.image = Image.new("RGB", size, (120, 110, 100))

    def __call__(self, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(images=[self.image.copy() for _ in range(len(kw["prompt"]) * kw["num_images_per_prompt"])])


def bench_overhead(args, models: dict[str, Any], timer: Timer) -> list[tuple[str, float]]:
    """(``models``: the tiny ones, whose forward passes are stubbed out.) Seconds per image of what refforge's classes do around the model, with the model replaced by a stub
    that answers at once, at the issue's sizes: 640x480 images, inpainting at 512 px (resize in, resize back,
    composite, per candidate), CLIP ViT-L/14's preprocessing (open_clip's ``image_transform``: 224 px,
    bicubic, shortest-side resize, OpenAI mean/std, as ``get_pretrained_cfg("ViT-L-14", "openai")``),
    DINOv2-B's (``BitImageProcessor``: shortest edge 256, centre crop 224, bicubic, ImageNet mean/std, as
    facebook/dinov2-base's preprocessor_config.json) and DIRE at 256 px. This is CPU time the stage adds to
    every image however fast the accelerator is: at a bare rate of R images/s the stage reaches
    1 / (1 + R * overhead) of it, so 70% holds while R <= 0.43 / overhead. (DIRE without its diffusion: the
    DDIM arithmetic runs on the device with the UNet. The stage also writes each candidate as PNG.)"""
    from types import SimpleNamespace

    import open_clip
    import torch
    from transformers import BitImageProcessor

    from refforge.stages.negatives_image import _png

    w, h, n, cand = 640, 480, 8, 2
    scenes = make_images(n, w, h, seed=1)
    wsize = working_size((w, h), 512)
    inp = DiffusersInpainter(models["inpaint_model"], candidates=cand, steps=1, size=512, batch_size=4,
                             margin=args.margin)
    inp.pipeline = _StubPipeline(wsize)
    requests = [EditRequest(image=im, box=box, kind="replace_category", prompt=f"a {name}", word=name, seed=i)
                for i, (im, box, _c, name) in enumerate(scenes)]
    rows = []
    sec, results = timer.median(lambda _: inp.edit(requests))
    rows.append(("DiffusersInpainter.edit, 640x480 at 512 px", sec / (n * cand)))
    edited = [im for r in results for im in r.images]
    originals = [r.image for r in requests for _ in range(cand)]
    texts = [f"a {r.word} {i}" for i, r in enumerate(requests) for _ in range(cand)]

    clip = S.ClipScorer(models["clip_model"], models["clip_pretrained"], batch_size=args.filter_batch)
    cfg = open_clip.get_pretrained_cfg("ViT-L-14", "openai")
    clip.preprocess = open_clip.image_transform(224, is_train=False, mean=cfg["mean"], std=cfg["std"],
                                                resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"])
    clip.model = SimpleNamespace(encode_image=lambda x: torch.zeros(len(x), 768),
                                 encode_text=lambda t: torch.zeros(len(t), 768))

    def margin(_):
        clip._text_cache.clear()
        return S.clip_margin_image(clip, originals, edited, texts)

    sec, _ = timer.median(margin)
    rows.append(("clip_margin_image, ViT-L/14 preprocessing", sec / len(edited)))

    dino = S.DinoScorer(models["dinov2_model"], batch_size=args.filter_batch)
    dino.processor = BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
                                       crop_size={"height": 224, "width": 224}, do_normalize=True,
                                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    dino.model = lambda pixel_values: SimpleNamespace(pooler_output=torch.zeros(len(pixel_values), 768))
    sec, _ = timer.median(lambda _: (dino.embeddings(edited), dino.embeddings(originals[::cand])))
    rows.append(("DinoScorer.embeddings, DINOv2-B preprocessing", sec / len(edited)))

    dire = S.DireScorer(models["dire_model"], steps=args.dire_steps, size=32, batch_size=args.filter_batch)
    dire.size = 256
    dire.reconstruct = lambda x: x  # the diffusion (device work) out: resizing in, error maps back out
    sec, _ = timer.median(lambda _: dire.score(edited))
    rows.append(("DireScorer.score at 256 px, without the diffusion", sec / len(edited)))
    sec, _ = timer.median(lambda _: [_png(im) for im in edited])
    rows.append(("negatives_image: PNG of a candidate (_png, level 1)", sec / len(edited)))
    print("\nrefforge's CPU work per image around the model (model stubbed; 640x480 images):")
    print(f"{'':<56} {'ms/image':>9} {'70% holds while bare <=':>24}")
    for name, per in rows:
        print(f"{name:<56} {per * 1000:>9.2f} {0.4286 / per:>18,.0f} img/s")
    return rows


# ---------------------------------------------------------------------------------------------------
# 3. the stages end to end


@contextlib.contextmanager
def instrumented():
    """Seconds spent inside the model calls while a build runs in this process: the inpainting pipeline's
    ``__call__``, ``DiffusersInpainter.edit``, its pipeline load, the scorers' calls and their loading."""
    spent: Counter = Counter()
    calls: Counter = Counter()
    patches: list[tuple[Any, str, Any]] = []

    def timed(name: str, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
                calls[name] += 1
        return wrapper

    def patch(owner, attr: str, name: str) -> None:
        orig = owner.__dict__[attr]
        patches.append((owner, attr, orig))
        setattr(owner, attr, timed(name, orig))

    patch(DiffusersInpainter, "edit", "inpainter.edit")
    patch(S.ClipScorer, "image_embeddings", "clip image")
    patch(S.ClipScorer, "text_embeddings", "clip text")
    patch(S.DinoScorer, "embeddings", "dinov2")
    patch(S.DireScorer, "score", "dire")
    import refforge.stages.filters.scorers as scorers_module

    orig_make = scorers_module.make_scorer
    scorers_module.make_scorer = timed("scorer loading", orig_make)
    orig_prop = DiffusersInpainter.__dict__["pipeline"]

    def fget(self):
        loading = self._pipeline is None
        t0 = time.perf_counter()
        pipe = orig_prop.fget(self)
        if loading:
            spent["inpaint pipeline loading"] += time.perf_counter() - t0
        cls = type(pipe)
        if not cls.__name__.startswith("_Timed"):  # time the pipeline's own __call__ (a subclass; same object)
            pipe.__class__ = type(f"_Timed{cls.__name__}", (cls,), {"__call__": timed("pipeline call", cls.__call__)})
        return pipe

    DiffusersInpainter.pipeline = property(fget, orig_prop.fset)
    try:
        yield spent, calls
    finally:
        DiffusersInpainter.pipeline = orig_prop
        scorers_module.make_scorer = orig_make
        for owner, attr, orig in reversed(patches):
            setattr(owner, attr, orig)


def bench_build(args, models: dict[str, Any], table: Table, tmp: Path) -> list[tuple]:
    from refforge.config import parse_config
    from refforge.flows.build import run_build
    from refforge.storage import Catalog

    w, h = args.width, args.height
    cfg = parse_config({
        "build": {"name": "bench-inpaint", "seed": 0, "shard_size": args.shard_size,
                  "stages": ["ingest", "paths", "negatives_image", "filters"]},
        "source": {"kind": "synthetic", "images": args.build_images, "width": w, "height": h, "max_objects": 5},
        "paths": {"max_hops": 1},
        "negatives_image": {"flip": False, "edits": ["remove", "replace_category"], "per_image": 1,
                            "inpainter": "diffusers", "model": models["inpaint_model"],
                            "candidates": args.candidates, "steps": args.steps, "size": args.size,
                            "batch_size": args.batch, "mask_margin": args.margin, "device": args.device,
                            "dtype": args.dtype},
        "filters": {"run": ["clip_margin", "dire", "dinov2", "outside_change", "masked_change", "seam"],
                    "clip_model": models["clip_model"], "clip_pretrained": models["clip_pretrained"],
                    "dinov2_model": models["dinov2_model"], "dire_model": models["dire_model"],
                    "dire_classifier": models.get("dire_classifier"), "dire_steps": args.dire_steps,
                    "dire_size": args.dire_size, "clip_margin": -1.0, "dire_threshold": 1.0,
                    "device": args.device, "dtype": args.dtype, "batch_size": args.filter_batch},
        "runner": {"kind": "thread", "workers": 1}})
    out = tmp / "build"
    t0 = time.perf_counter()
    with instrumented() as (spent, calls):
        record = run_build(cfg, out)
    build_wall = time.perf_counter() - t0
    with Catalog(out) as cat:
        derived = cat.sql("SELECT count(*) AS n, count(DISTINCT edit.group) AS g FROM images "
                          "WHERE edit IS NOT NULL").to_pylist()[0]
        samples = cat.sql("SELECT count(*) AS n FROM expressions WHERE negative_source = 'image'").to_pylist()[0]["n"]
    st = record["stages"]
    d, edits = derived["n"], derived["g"]
    r = table.rates
    bare_inpaint = edits * args.candidates / r["inpaint/bare pipeline (num_images_per_prompt=N)"]
    # the filters' bare work for this build: every edited image through DIRE and DINOv2 (with its
    # original), every image negative's original and edited image through CLIP
    bare_filters = (d / r[f"dire/bare UNet passes (2 x {args.dire_steps} steps)"]
                    + d / r["dinov2/bare Dinov2Model forward (originals+edited)"]
                    + samples / r["clip margin/bare encode_image (originals+edited) + text"]
                    + sum(d / r[f"offline/{k}"] for k in ("outside_change", "masked_change", "seam")))
    ni, fi = st["negatives_image"], st["filters"]
    rows = [
        ("negatives_image", ni["wall_seconds"], ni["units"], edits * args.candidates, bare_inpaint,
         spent["inpainter.edit"], spent["pipeline call"], spent["inpaint pipeline loading"]),
        ("filters", fi["wall_seconds"], fi["units"], d, bare_filters,
         spent["clip image"] + spent["clip text"] + spent["dinov2"] + spent["dire"], None, spent["scorer loading"]),
    ]
    print(f"\nbuild: {args.build_images} synthetic images {w}x{h}, shard {args.shard_size}, one worker thread; "
          f"{edits} edits x {args.candidates} candidates = {d} edited images, {samples} image negatives; "
          f"run_build {build_wall:.1f} s (Prefect server start and the other stages included)")
    print(f"{'stage':<16} {'units':>5} {'wall s':>8} {'images':>7} {'images/s':>9} {'bare s':>8} "
          f"{'bare/wall':>9} {'in model calls s':>17} {'in pipeline s':>14} {'loading s':>10}")
    for name, wall, units, n, bare, inside, pipe_s, load in rows:
        print(f"{name:<16} {units:>5} {wall:>8.2f} {n:>7} {n / wall:>9.1f} {bare:>8.2f} {bare / wall:>8.1%} "
              f"{inside:>17.2f} {'' if pipe_s is None else f'{pipe_s:.2f}':>14} {load:>10.2f}")
    print(f"calls: {dict(calls)}")
    return rows


# ---------------------------------------------------------------------------------------------------


def tiny_models(root: Path) -> dict[str, Any]:
    from refforge.testing.tiny_filters import save_tiny_clip, save_tiny_dinov2, save_tiny_pixel_diffusion
    from refforge.testing.tiny_inpaint import save_tiny_sd_inpaint

    clip_name, clip_ckpt = save_tiny_clip(root / "clip")
    return {"inpaint_model": save_tiny_sd_inpaint(root / "inpaint"), "clip_model": clip_name,
            "clip_pretrained": clip_ckpt, "dinov2_model": save_tiny_dinov2(root / "dino"),
            "dire_model": save_tiny_pixel_diffusion(root / "dire")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inpaint-model", help="an inpainting pipeline folder (default: the tiny one)")
    ap.add_argument("--clip-model", help="open_clip model name or local-dir:/hf-hub: (default: the tiny one)")
    ap.add_argument("--clip-pretrained", help="its checkpoint file or tag")
    ap.add_argument("--dinov2-model", help="a Dinov2Model folder or hub id")
    ap.add_argument("--dire-model", help="a diffusers pipeline folder (pixel UNet2DModel or latent SD)")
    ap.add_argument("--dire-classifier", help="a DIRE ResNet-50 checkpoint (optional)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--size", type=int, default=64, help="inpainting working size (longer side)")
    ap.add_argument("--steps", type=int, default=4, help="inpainting steps")
    ap.add_argument("--batch", type=int, default=4, help="edits per pipeline call")
    ap.add_argument("--candidates", type=int, default=2, help="candidates per edit")
    ap.add_argument("--images", type=int, default=8, help="edits in the timed batch")
    ap.add_argument("--image-size", default="128x96", help="WxH of the images (and of the build's)")
    ap.add_argument("--margin", type=int, default=4, help="mask margin, px")
    ap.add_argument("--filter-batch", type=int, default=16, help="images per scorer forward pass")
    ap.add_argument("--dire-steps", type=int, default=4)
    ap.add_argument("--dire-size", type=int, default=32)
    ap.add_argument("--build-images", type=int, default=24)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--no-build", action="store_true", help="skip the end-to-end build")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    args.width, args.height = (int(v) for v in args.image_size.lower().split("x"))

    import diffusers
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    for lib in (diffusers.utils.logging, transformers.utils.logging):  # load/save chatter and progress bars
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix="refforge-bench-inpaint-"))
    t_start = time.perf_counter()
    try:
        given = {"inpaint_model": args.inpaint_model, "clip_model": args.clip_model,
                 "clip_pretrained": args.clip_pretrained, "dinov2_model": args.dinov2_model,
                 "dire_model": args.dire_model}
        tiny_set = tiny_models(tmp / "models")  # the stubbed overhead rows always use these (cheap to load)
        models = dict(tiny_set)
        tiny = sorted(k for k, v in given.items() if not v and k != "clip_pretrained")
        if args.clip_model:
            models.update(clip_model=args.clip_model, clip_pretrained=args.clip_pretrained)
        models.update({k: v for k, v in given.items() if v and k != "clip_model" and k != "clip_pretrained"})
        if args.dire_classifier:
            models["dire_classifier"] = args.dire_classifier
        print(f"machine: {machine(args.device)}")
        print(f"models: tiny random: {', '.join(tiny) or 'none'}; given: "
              f"{ {k: v for k, v in models.items() if v and v != tiny_set.get(k)} or 'none'}")
        print(f"inpainting: {args.images} edits of {args.width}x{args.height}, {args.candidates} candidates each, "
              f"{args.batch} edits per call, {args.steps} steps at working size "
              f"{'x'.join(map(str, working_size((args.width, args.height), args.size)))}, device {args.device}; "
              f"filters: batch {args.filter_batch}, DIRE {args.dire_steps} steps at {args.dire_size} px; "
              f"median of {args.repeats} after one warm-up")
        scenes = make_images(max(args.images, 1), args.width, args.height)
        timer = Timer(args.device, args.repeats)
        table = Table()
        inpainted = bench_inpainting(args, models["inpaint_model"], scenes, timer, table)
        del inpainted["pipeline"]
        bench_filters(args, models, inpainted, timer, table)
        table.print()
        bench_overhead(args, tiny_set, timer)
        if not args.no_build:
            bench_build(args, models, table, tmp)
        print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
