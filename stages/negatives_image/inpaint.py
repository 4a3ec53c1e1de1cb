"""Image-editing backends for image negatives: remove the target, replace its category, change an attribute.

One interface (:class:`Inpainter`): ``edit(requests) -> [EditResult | refusal slug]``, one result per
request, in order. A result holds the candidate images (same size as the original), the mask (the only
pixels that may differ from the original: every candidate is composited so the outside is bit-exact),
one seed per candidate and the model that made them. The stage that calls this plans the edits, checks
them on the scene graph and writes the tables; nothing here touches a build.

Backends (:func:`make_inpainter`):

``"offline"`` -> :class:`OpenCVInpainter` (OpenCV only, deterministic, one candidate)
    ``remove``: ``cv2.inpaint`` (Telea or Navier-Stokes) over the object's region dilated by ``margin``
    when the request carries it, else over the box dilated by ``margin``.
    ``change_attribute`` with family ``colour``: recolour in HSV. The object's pixels are the request's
    ``region``, else a ``cv2.grabCut`` segmentation initialised with the box, else (grabCut failed or
    found almost nothing) the ellipse inscribed in the box. Hue and saturation move to the target
    colour's; the value channel is shifted so that its median becomes the target's, which keeps the
    shading and pattern as differences. Achromatic targets (white, black, gray, silver, ...) get their
    low saturation and their value. Refusals: ``unsupported_edit`` (other kinds and families),
    ``unknown_colour`` (a colour word not in :data:`COLOUR_HSV`), ``empty_box``.

``"diffusers"`` -> :class:`DiffusersInpainter` (torch + diffusers, the ``models`` extra)
    Any inpainting pipeline ``diffusers.AutoPipelineForInpainting`` loads (Stable Diffusion 1.x/2.x
    inpainting, SDXL inpainting, Kandinsky 2.2 decoder -> its combined prior+decoder pipeline, SD3, ...),
    N candidates per edit, batched over edits. See the class docstring for the seeding contract.

``box_mask``, ``composite`` and ``fidelity`` are plain numpy.
"""

from __future__ import annotations

import colorsys
import importlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
from PIL import Image

from refforge.optional import check_packages, require
from refforge.stages.ingest.synthetic import COLOURS as SYNTHETIC_COLOURS

KINDS: tuple[str, ...] = ("remove", "replace_category", "change_attribute")

# refusal slugs
UNSUPPORTED = "unsupported_edit"
UNKNOWN_COLOUR = "unknown_colour"
EMPTY_BOX = "empty_box"
UNKNOWN_KIND = "unknown_edit_kind"


@dataclass(frozen=True)
class EditRequest:
    image: Image.Image  # the original, RGB
    box: tuple[float, float, float, float]  # the edited object's box, (x1, y1, x2, y2) pixels
    kind: str  # "remove" | "replace_category" | "change_attribute"
    prompt: str  # what should be in the mask afterwards ("a blue cup", "a bowl", "" for removal)
    negative_prompt: str | None = None  # e.g. the removed category
    word: str | None = None  # the replacement word (category or attribute value)
    family: str | None = None  # attribute family of change_attribute: "colour", "size", ...
    seed: int = 0
    region: np.ndarray | None = field(default=None, compare=False)  # bool HxW: the object's pixels, if known


@dataclass
class EditResult:
    images: list[Image.Image]  # the candidates, same size as the original
    mask: np.ndarray  # bool HxW: the only pixels allowed to differ from the original
    seeds: list[int]  # one per candidate
    model: str  # what made them


@runtime_checkable
class Inpainter(Protocol):
    name: str
    candidates: int

    def supports(self, kind: str, family: str | None = None) -> bool: ...

    def edit(self, requests: Sequence[EditRequest]) -> list[EditResult | str]: ...


# ---------------------------------------------------------------------------------------------------
# numpy helpers
# ---------------------------------------------------------------------------------------------------


def _int_box(box, width: int, height: int, margin: int = 0) -> tuple[int, int, int, int]:
    """Pixel bounds [x1, x2) x [y1, y2) of ``box`` grown by ``margin`` and clipped (may be empty)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    ix1 = max(0, int(math.floor(x1)) - margin)
    iy1 = max(0, int(math.floor(y1)) - margin)
    ix2 = min(width, int(math.ceil(x2)) + margin)
    iy2 = min(height, int(math.ceil(y2)) + margin)
    return ix1, iy1, max(ix1, ix2), max(iy1, iy2)


def box_mask(size: tuple[int, int], box, margin: int) -> np.ndarray:
    """Bool ``(height, width)`` mask of ``box`` (x1, y1, x2, y2 pixels; fractional edges round outwards),
    dilated by ``margin`` pixels on every side and clipped to the image. ``size`` is ``(width, height)``."""
    width, height = int(size[0]), int(size[1])
    mask = np.zeros((height, width), dtype=bool)
    x1, y1, x2, y2 = _int_box(box, width, height, int(margin))
    mask[y1:y2, x1:x2] = True
    return mask


def _rgb_array(img) -> np.ndarray:
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def composite(original: Image.Image, generated: Image.Image, mask: np.ndarray) -> Image.Image:
    """``generated`` inside ``mask``, ``original`` outside; bit-exact outside. Sizes must agree."""
    orig = _rgb_array(original)
    gen = _rgb_array(generated)
    mask = np.asarray(mask, dtype=bool)
    if gen.shape != orig.shape or mask.shape != orig.shape[:2]:
        raise ValueError(
            f"composite needs equal sizes: original {orig.shape}, generated {gen.shape}, mask {mask.shape}"
        )
    out = orig.copy()
    out[mask] = gen[mask]
    return Image.fromarray(out, mode="RGB")


def fidelity(original, edited, truth, mask) -> dict[str, float]:
    """Edit fidelity against a ground-truth edited image (e.g. the synthetic scene re-rendered after the edit).

    All differences are per channel on the 0..1 scale (|a - b| / 255), averaged over pixels and channels:

    - ``masked_error``: mean |edited - truth| inside ``mask``;
    - ``outside_change``: mean |edited - original| outside ``mask``;
    - ``outside_changed_frac``: the fraction of outside pixels where any channel differs;
    - ``truth_masked_change``: mean |truth - original| inside ``mask`` (how big the true edit is; an edit
      does better than leaving the image alone when ``masked_error < truth_masked_change``).

    A mean over no pixels (an empty mask, or a mask covering everything) is 0.0.
    """
    o, e, t = _rgb_array(original), _rgb_array(edited), _rgb_array(truth)
    m = np.asarray(mask, dtype=bool)
    if not (o.shape == e.shape == t.shape) or m.shape != o.shape[:2]:
        raise ValueError(f"fidelity needs equal sizes: {o.shape}, {e.shape}, {t.shape}, mask {m.shape}")
    # sums of uint8 differences; the inside of the mask only over its bounding box (fast on big images)
    d_eo = cv2.absdiff(np.ascontiguousarray(e), np.ascontiguousarray(o))
    n_in = int(m.sum())
    n_out = m.size - n_in
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if n_in:
        sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        mm = m[sl]
        in_eo = d_eo[sl][mm]
        in_et = cv2.absdiff(np.ascontiguousarray(e[sl]), np.ascontiguousarray(t[sl]))[mm]
        in_to = cv2.absdiff(np.ascontiguousarray(t[sl]), np.ascontiguousarray(o[sl]))[mm]
    else:
        in_eo = in_et = in_to = np.zeros((0, 3), dtype=np.uint8)
    total_eo = float(d_eo.sum(dtype=np.int64))
    changed_all = int(np.count_nonzero(d_eo.max(axis=-1)))
    changed_in = int(np.count_nonzero(in_eo.max(axis=-1))) if n_in else 0

    def mean(total: float, n: int) -> float:
        return total / (255.0 * n) if n else 0.0

    return {
        "masked_error": mean(float(in_et.sum(dtype=np.int64)), 3 * n_in),
        "outside_change": mean(total_eo - float(in_eo.sum(dtype=np.int64)), 3 * n_out),
        "outside_changed_frac": (changed_all - changed_in) / n_out if n_out else 0.0,
        "truth_masked_change": mean(float(in_to.sum(dtype=np.int64)), 3 * n_in),
    }


# ---------------------------------------------------------------------------------------------------
# OpenCV backend
# ---------------------------------------------------------------------------------------------------

# colour name -> RGB (the synthetic source's palette where it has the name, common web colours otherwise)
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    **SYNTHETIC_COLOURS,
    "grey": SYNTHETIC_COLOURS["gray"],
    "silver": (192, 192, 196),
    "beige": (222, 206, 170),
    "tan": (210, 180, 140),
    "cream": (245, 238, 214),
    "ivory": (250, 248, 236),
    "gold": (212, 175, 55),
    "golden": (212, 175, 55),
    "cyan": (40, 200, 220),
    "teal": (0, 128, 128),
    "turquoise": (64, 208, 190),
    "navy": (24, 36, 110),
    "maroon": (120, 20, 30),
    "violet": (150, 90, 210),
    "magenta": (210, 40, 170),
    "lavender": (190, 170, 230),
    "olive": (110, 110, 30),
    "lime": (150, 220, 50),
    "khaki": (190, 180, 120),
    "blond": (230, 200, 130),
    "blonde": (230, 200, 130),
    "dark": (40, 40, 44),
    "light": (225, 225, 225),
}


def _hsv(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    return h * 360.0, s, v


# colour name -> (hue degrees 0..360, saturation 0..1, value 0..1)
COLOUR_HSV: dict[str, tuple[float, float, float]] = {k: _hsv(v) for k, v in COLOUR_RGB.items()}
ACHROMATIC_SAT = 0.2  # a target colour at or below this saturation is achromatic (white, gray, silver...)


def colour_hsv(word: str | None) -> tuple[float, float, float] | None:
    """HSV of a colour word (case and surrounding space ignored; "light blue" -> "blue"), or None."""
    if not word:
        return None
    w = " ".join(word.lower().split())
    if w in COLOUR_HSV:
        return COLOUR_HSV[w]
    last = w.split(" ")[-1]
    return COLOUR_HSV.get(last)


class OpenCVInpainter:
    """The offline backend: ``cv2.inpaint`` for removal, an HSV recolour for colour changes (module docstring)."""

    name = "offline"
    candidates = 1

    def __init__(
        self, method: str = "telea", radius: int = 5, margin: int = 6, grabcut_iters: int = 4
    ) -> None:
        if method not in ("telea", "ns"):
            raise ValueError(f"method must be 'telea' or 'ns', not {method!r}")
        self.method = method
        self.radius = int(radius)
        self.margin = int(margin)
        self.grabcut_iters = int(grabcut_iters)
        self._cv2 = cv2  # a core dependency (opencv-python-headless)

    @property
    def model(self) -> str:
        return f"opencv-{self.method}"

    def supports(self, kind: str, family: str | None = None) -> bool:
        return kind == "remove" or (kind == "change_attribute" and family == "colour")

    def edit(self, requests: Sequence[EditRequest]) -> list[EditResult | str]:
        return [self._one(r) for r in requests]

    def _one(self, req: EditRequest) -> EditResult | str:
        if req.kind not in KINDS:
            return UNKNOWN_KIND
        if not self.supports(req.kind, req.family):
            return UNSUPPORTED
        width, height = req.image.size
        x1, y1, x2, y2 = _int_box(req.box, width, height)
        if x2 <= x1 or y2 <= y1:
            return EMPTY_BOX
        if req.kind == "remove":
            return self._remove(req)
        return self._recolour(req)

    def _dilate(self, mask: np.ndarray, px: int) -> np.ndarray:
        cv2 = self._cv2
        if px <= 0:
            return mask.copy()
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
        return cv2.dilate(mask.astype(np.uint8), kernel) > 0

    def _remove(self, req: EditRequest) -> EditResult:
        cv2 = self._cv2
        orig = np.asarray(req.image.convert("RGB"))
        if req.region is not None and np.asarray(req.region, dtype=bool).any():
            mask = self._dilate(np.asarray(req.region, dtype=bool), self.margin)
        else:
            mask = box_mask(req.image.size, req.box, self.margin)
        flag = cv2.INPAINT_TELEA if self.method == "telea" else cv2.INPAINT_NS
        bgr = cv2.cvtColor(orig, cv2.COLOR_RGB2BGR)
        filled = cv2.inpaint(bgr, mask.astype(np.uint8) * 255, self.radius, flag)
        out = composite(req.image, Image.fromarray(cv2.cvtColor(filled, cv2.COLOR_BGR2RGB)), mask)
        return EditResult(images=[out], mask=mask, seeds=[req.seed], model=self.model)

    def object_region(self, image: Image.Image, box) -> tuple[np.ndarray, str]:
        """The object's pixels inside ``box``: (bool HxW, how) with how ``"grabcut"`` or ``"ellipse"``."""
        cv2 = self._cv2
        width, height = image.size
        x1, y1, x2, y2 = _int_box(box, width, height)
        w, h = x2 - x1, y2 - y1
        region = None
        if w >= 3 and h >= 3 and (w < width or h < height):
            bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
            gc = np.zeros((height, width), np.uint8)
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            try:
                cv2.setRNGSeed(0)  # grabCut's GMM initialisation uses k-means with OpenCV's RNG
                cv2.grabCut(bgr, gc, (x1, y1, w, h), bgd, fgd, self.grabcut_iters, cv2.GC_INIT_WITH_RECT)
                fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
                if fg.sum() >= 0.1 * w * h:  # almost nothing found: not a segmentation of this object
                    region = fg
            except cv2.error:
                region = None
        if region is not None:
            return region, "grabcut"
        ell = np.zeros((height, width), np.uint8)
        if w > 0 and h > 0:
            centre = (int(round(x1 + (w - 1) / 2)), int(round(y1 + (h - 1) / 2)))
            cv2.ellipse(ell, centre, (max(w // 2, 1), max(h // 2, 1)), 0, 0, 360, 1, thickness=-1)
        return ell > 0, "ellipse"

    def _recolour(self, req: EditRequest) -> EditResult | str:
        cv2 = self._cv2
        target = colour_hsv(req.word)
        if target is None:
            return UNKNOWN_COLOUR
        if req.region is not None and np.asarray(req.region, dtype=bool).any():
            region = np.asarray(req.region, dtype=bool)
        else:
            region, _ = self.object_region(req.image, req.box)
        orig = np.asarray(req.image.convert("RGB"))
        hsv = cv2.cvtColor(orig.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)  # H 0..360, S, V 0..1
        s, v = hsv[..., 1], hsv[..., 2]
        th, ts, tv = target
        vs, ss = v[region], s[region]
        med_v, med_s = float(np.median(vs)), float(np.median(ss))
        new = hsv.copy()
        new[..., 0][region] = th
        if ts <= ACHROMATIC_SAT:
            new[..., 1][region] = np.clip(ts + 0.25 * (ss - med_s), 0.0, 1.0)
        else:
            new[..., 1][region] = np.clip(ts + (ss - med_s), 0.15, 1.0)
        new[..., 2][region] = np.clip(tv + (vs - med_v), 0.0, 1.0)
        rgb = cv2.cvtColor(new, cv2.COLOR_HSV2RGB)
        rgb8 = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
        out = composite(req.image, Image.fromarray(rgb8), region)
        return EditResult(images=[out], mask=region.copy(), seeds=[req.seed], model="opencv-hsv-recolour")


# ---------------------------------------------------------------------------------------------------
# diffusers backend
# ---------------------------------------------------------------------------------------------------

# PowerPaint's wording of its task prompts (open-mmlab/PowerPaint app.py, TASK_PROMPT["ppt2"]): object
# removal puts "{prompt} empty scene blur" beside the learned task token P_ctxt; every task adds this
# quality suffix to the negative prompt.
POWERPAINT_REMOVAL_SUFFIX = "empty scene blur"
POWERPAINT_NEGATIVE_SUFFIX = "worst quality, low quality, normal quality, bad quality, blurry"

_DTYPES = {
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}


def working_size(size: tuple[int, int], longer: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``longer``, both sides rounded to multiples of 8 (>= 8)."""
    w, h = size
    scale = longer / max(w, h)
    return max(8, int(round(w * scale / 8)) * 8), max(8, int(round(h * scale / 8)) * 8)


def powerpaint_prompts(kind: str, prompt: str, negative: str | None) -> tuple[str, str]:
    """(prompt, negative prompt) worded as PowerPaint words its tasks, minus its learned task tokens."""
    neg = f"{negative}, {POWERPAINT_NEGATIVE_SUFFIX}" if negative else POWERPAINT_NEGATIVE_SUFFIX
    if kind == "remove":
        return f"{prompt} {POWERPAINT_REMOVAL_SUFFIX}".strip(), neg
    return prompt, neg


class DiffusersInpainter:
    """N inpainting candidates per edit from a diffusers inpainting pipeline, batched over edits.

    ``model`` is a local folder or a hub id, loaded once (on first use) with
    ``diffusers.AutoPipelineForInpainting.from_pretrained(model, dtype=...)`` (``torch_dtype=`` on
    releases that lack ``dtype=``), moved to ``device``, progress bar off, safety checker removed where the pipeline has one. ``dtype="auto"`` is float16 on
    CUDA and float32 elsewhere; "bf16" / "fp16" / "fp32" (or the torch names) choose explicitly.

    Each edit's mask is its box dilated by ``margin`` px. Image and mask are resized so the longer side
    is ``size`` (sides multiples of 8), requests are grouped by that working size, and each group is
    cut into pipeline calls of at most ``batch_size`` edits. The generated images are resized back to
    the original size and composited with the original, so outside the mask nothing changes (exactly).

    Seeding. Candidate ``j`` of an edit has seed ``request.seed + j``; each candidate's images come from
    ``torch.Generator(device).manual_seed(seed + j)``. How the pipeline consumes a generator list
    (diffusers 0.42, pipeline_stable_diffusion_inpaint.py; SDXL's inpaint pipeline is the same): the
    list must have one generator per output image; the initial noise of output ``i`` is drawn from
    ``generator[i]`` (``randn_tensor``), and outputs are ordered prompt-major (prompt 0's
    ``num_images_per_prompt`` images, then prompt 1's, ...); but the masked image is VAE-encoded once per
    *prompt*, and its latent is *sampled* (``latent_dist.sample``) with ``generator[p]`` for prompt
    ``p`` -- i.e. with the generator of output ``p``, which belongs to another edit when ``p > 0``. With
    ``num_images_per_prompt=candidates`` an edit's pixels would therefore depend on its position in the
    batch and its neighbours' seeds. So by default (``expand=True``) every candidate is its own batch
    row: the prompt, image and mask are repeated ``candidates`` times, ``num_images_per_prompt=1``, and
    row ``i`` uses only ``generator[i]`` for its noise, its masked-image latent and any scheduler noise:
    an edit's candidates depend only on its request and seed (up to float differences between batch
    sizes). ``expand=False`` passes ``num_images_per_prompt=candidates`` (one text and VAE encoding per
    edit instead of per candidate) and accepts the coupling.

    ``prompt_style``: ``"plain"`` passes the request's prompt and negative prompt as they are.
    ``"powerpaint"`` words them the way PowerPaint (open-mmlab/PowerPaint, app.py ``TASK_PROMPT``,
    ``ppt2``) words its tasks: a removal's prompt gets `` empty scene blur`` appended (an empty prompt
    becomes ``"empty scene blur"``), and every negative prompt gets ``, worst quality, low quality,
    normal quality, bad quality, blurry`` appended (the request's negative prompt, e.g. the removed
    category, first). PowerPaint's learned task tokens (``P_ctxt``, ``P_obj``, ``P_shape``, ten
    embedding vectors each, added to its own tokenizer) and its two-prompt ``tradeoff`` blending need
    PowerPaint's own pipeline and weights, so they are not used: with a plain pipeline this is prompt
    wording only.

    Supported: ``remove``, ``replace_category`` and ``change_attribute`` of any family except those in
    ``refuse_families`` (default ``("size",)``: the mask is the old box, so a bigger object cannot fit
    and the edited box is unknown).
    """

    name = "diffusers"

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "auto",
        candidates: int = 10,
        steps: int = 20,
        guidance_scale: float = 7.5,
        strength: float = 1.0,
        margin: int = 8,
        batch_size: int = 4,
        size: int = 512,
        prompt_style: str = "plain",
        expand: bool = True,
        refuse_families: Sequence[str] = ("size",),
    ) -> None:
        check_packages([("torch", "models"), ("diffusers", "models")], "the diffusers inpainter")
        if prompt_style not in ("plain", "powerpaint"):
            raise ValueError(f"prompt_style must be 'plain' or 'powerpaint', not {prompt_style!r}")
        if candidates < 1 or batch_size < 1 or steps < 1 or size < 8:
            raise ValueError("candidates, batch_size, steps must be >= 1 and size >= 8")
        self.model = str(model)
        self.device = str(device)
        self.dtype = str(dtype)
        self.candidates = int(candidates)
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.strength = float(strength)
        self.margin = int(margin)
        self.batch_size = int(batch_size)
        self.size = int(size)
        self.prompt_style = prompt_style
        self.expand = bool(expand)
        self.refuse_families = tuple(refuse_families)
        self._pipeline: Any = None

    # -- loading -------------------------------------------------------------------------------------

    def torch_dtype(self):
        torch = require("torch", "models")
        if self.dtype == "auto":
            return torch.float16 if self.device.startswith("cuda") else torch.float32
        name = _DTYPES.get(self.dtype.lower())
        if name is None:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected auto, fp16, bf16 or fp32")
        return getattr(torch, name)

    @property
    def pipeline(self):
        """The loaded pipeline (loaded on first access). Assignable, e.g. to wrap it in a test."""
        if self._pipeline is None:
            diffusers = require("diffusers", "models", feature="the diffusers inpainter")
            # diffusers 0.42 deprecates from_pretrained's torch_dtype= for dtype= (a FutureWarning, removal
            # planned for 1.0: diffusers/utils/deprecation_utils.py _resolve_dtype); older releases only
            # know torch_dtype=
            deprecation = importlib.import_module("diffusers.utils.deprecation_utils")
            key = "dtype" if hasattr(deprecation, "_resolve_dtype") else "torch_dtype"
            pipe = diffusers.AutoPipelineForInpainting.from_pretrained(
                self.model, **{key: self.torch_dtype()}
            )
            pipe = pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            if getattr(pipe, "safety_checker", None) is not None:
                pipe.safety_checker = None
            self._pipeline = pipe
        return self._pipeline

    @pipeline.setter
    def pipeline(self, value) -> None:
        self._pipeline = value

    def _accepted(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` less what the pipeline's ``__call__`` does not take (Kandinsky has no ``strength``)."""
        try:
            params = inspect.signature(self.pipeline.__call__).parameters
        except (TypeError, ValueError):
            return kwargs
        if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return kwargs
        return {k: v for k, v in kwargs.items() if k in params}

    # -- editing -------------------------------------------------------------------------------------

    def supports(self, kind: str, family: str | None = None) -> bool:
        if kind not in KINDS:
            return False
        return not (kind == "change_attribute" and family in self.refuse_families)

    def prompts(self, req: EditRequest) -> tuple[str, str]:
        if self.prompt_style == "powerpaint":
            return powerpaint_prompts(req.kind, req.prompt, req.negative_prompt)
        return req.prompt, req.negative_prompt or ""

    def edit(self, requests: Sequence[EditRequest]) -> list[EditResult | str]:
        out: list[EditResult | str | None] = [None] * len(requests)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, req in enumerate(requests):
            if req.kind not in KINDS:
                out[i] = UNKNOWN_KIND
                continue
            if not self.supports(req.kind, req.family):
                out[i] = UNSUPPORTED
                continue
            width, height = req.image.size
            x1, y1, x2, y2 = _int_box(req.box, width, height)
            if x2 <= x1 or y2 <= y1:
                out[i] = EMPTY_BOX
                continue
            groups.setdefault(working_size(req.image.size, self.size), []).append(i)
        for wsize, idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                for i, res in zip(chunk, self._run([requests[i] for i in chunk], wsize), strict=True):
                    out[i] = res
        return [r if r is not None else UNSUPPORTED for r in out]

    def _run(self, reqs: list[EditRequest], wsize: tuple[int, int]) -> list[EditResult]:
        torch = require("torch", "models")
        n = self.candidates
        masks = [box_mask(r.image.size, r.box, self.margin) for r in reqs]
        images = [r.image.convert("RGB").resize(wsize, Image.Resampling.LANCZOS) for r in reqs]
        mask_images = [
            Image.fromarray(m.astype(np.uint8) * 255, mode="L").resize(wsize, Image.Resampling.NEAREST)
            for m in masks
        ]
        texts = [self.prompts(r) for r in reqs]
        gen_device = self.device if self.device != "mps" else "cpu"
        generators = [
            torch.Generator(gen_device).manual_seed(int(r.seed) + j) for r in reqs for j in range(n)
        ]
        rep = n if self.expand else 1
        kwargs: dict[str, Any] = {
            "prompt": [t[0] for t in texts for _ in range(rep)],
            "negative_prompt": [t[1] for t in texts for _ in range(rep)],
            "image": [im for im in images for _ in range(rep)],
            "mask_image": [m for m in mask_images for _ in range(rep)],
            "num_images_per_prompt": 1 if self.expand else n,
            "generator": generators,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "strength": self.strength,
            "width": wsize[0],
            "height": wsize[1],
            "output_type": "pil",
        }
        kwargs = self._accepted(kwargs)
        with torch.inference_mode():
            result = self.pipeline(**kwargs)
        outputs = list(result.images)
        if len(outputs) != len(reqs) * n:
            raise RuntimeError(
                f"the pipeline returned {len(outputs)} images for {len(reqs)} edits x {n} candidates"
            )
        results = []
        for e, (req, mask) in enumerate(zip(reqs, masks, strict=True)):
            cands = []
            for j in range(n):
                gen = outputs[e * n + j]
                if not isinstance(gen, Image.Image):
                    gen = Image.fromarray(np.clip(np.rint(np.asarray(gen) * 255), 0, 255).astype(np.uint8))
                back = gen.convert("RGB").resize(req.image.size, Image.Resampling.BICUBIC)
                cands.append(composite(req.image, back, mask))
            results.append(
                EditResult(
                    images=cands, mask=mask, seeds=[int(req.seed) + j for j in range(n)], model=self.model
                )
            )
        return results


def make_inpainter(kind: str, **opts) -> Inpainter:
    """``"offline"`` -> :class:`OpenCVInpainter`, ``"diffusers"`` -> :class:`DiffusersInpainter`."""
    if kind == "offline":
        return OpenCVInpainter(**opts)
    if kind == "diffusers":
        return DiffusersInpainter(**opts)
    raise ValueError(f"unknown inpainter kind {kind!r}; expected 'offline' or 'diffusers'")
