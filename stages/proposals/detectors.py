"""Object proposals for images without (complete) scene graphs: tagger -> detector -> NMS.

:func:`propose` runs the stage over a batch of PIL images:

1. labels: a :class:`Tagger`'s tags (sorted by score, ``score >= tag_threshold``, at most
   ``max_tags``), else the fixed ``vocabulary``, else no labels (a class-agnostic detector
   needs none; an open-vocabulary one then finds nothing);
2. a :class:`Detector` boxes those labels in each image;
3. :func:`filter_proposals`: boxes clipped to the image, ``score >= box_threshold``, box area
   between ``min_area_frac`` and ``max_area_frac`` of the image, the NMS rule of
   :mod:`refforge.stages.proposals.nms`, then the best ``max_per_image``.

Backends (see :func:`make_tagger`, :func:`make_detector`):

* taggers: ``"none"``, ``"vocabulary"`` (every word, score 1.0), ``"open_clip"`` (zero-shot CLIP);
* detectors: ``"offline"`` (:class:`ColourRegionDetector`: colour segmentation -> connected
  components -> boxes scored by contrast and compactness; numpy and PIL only) and
  ``"grounding_dino"`` (:class:`GroundingDinoDetector`, transformers).

torch, transformers and open_clip are imported inside the model backends only
(:func:`refforge.optional.require`); a missing one raises ``MissingPackage`` naming
``pip install 'refforge[models]'``.

>>> from PIL import Image, ImageDraw
>>> img = Image.new("RGB", (200, 100), (230, 230, 230))
>>> ImageDraw.Draw(img).rectangle((20, 30, 79, 69), fill=(200, 20, 20))
>>> [p] = propose([img], None, make_detector("offline"), ProposalParams())[0]
>>> p.name, p.box, p.score > 0.9
('object', (20.0, 30.0, 80.0, 70.0), True)
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image, ImageFilter

from refforge.optional import install_command, require
from refforge.stages.scene.boxes import box_area, clip_boxes

from .nms import nms

__all__ = [
    "INSTALL_HINT",
    "ColourRegionDetector",
    "Detector",
    "GroundingDinoDetector",
    "OpenClipTagger",
    "Proposal",
    "ProposalParams",
    "Tagger",
    "VocabularyTagger",
    "filter_proposals",
    "grounding_prompt",
    "make_detector",
    "make_tagger",
    "match_label",
    "propose",
    "select_tags",
]

INSTALL_HINT = install_command("models")


@dataclass(frozen=True)
class Proposal:
    """A labelled box: ``box`` is ``(x1, y1, x2, y2)`` in pixels of the original image."""

    name: str
    box: tuple[float, float, float, float]
    score: float
    origin: Literal["detector", "tagger"] = "detector"


class Tagger(Protocol):
    """Image-level tags: for each image, ``(tag, score)`` pairs."""

    def tags(self, images: Sequence[Image.Image]) -> list[list[tuple[str, float]]]: ...


class Detector(Protocol):
    """Boxes for the given labels (one label list per image), in pixels of each original image."""

    def detect(self, images: Sequence[Image.Image], labels: Sequence[Sequence[str]]) -> list[list[Proposal]]: ...


@dataclass(frozen=True)
class ProposalParams:
    """Thresholds of the proposals stage (see the module docstring for where each applies).

    ``nms_iou``/``nms_ios`` are the overlap and containment thresholds of the NMS rule;
    ``class_agnostic`` lets boxes of any two labels suppress each other.
    """

    box_threshold: float = 0.35
    text_threshold: float = 0.25
    max_tags: int = 20
    tag_threshold: float = 0.0
    nms_iou: float = 0.5
    nms_ios: float = 0.8
    min_area_frac: float = 0.001
    max_area_frac: float = 0.95
    max_per_image: int = 50
    class_agnostic: bool = False


# ---------------------------------------------------------------------------------------------
# the stage


def _clean_label(label: str) -> str:
    return re.sub(r"\s+", " ", label.strip().strip(".").strip()).lower()


def _unique_labels(labels: Sequence[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        c = _clean_label(label)
        if c and c not in out:
            out.append(c)
    return out


def select_tags(tags: Sequence[tuple[str, float]], params: ProposalParams) -> list[str]:
    """The labels a tagger's output gives the detector: best first, ``score >= tag_threshold``,
    duplicates (after lowercasing) dropped, at most ``max_tags``.

    >>> select_tags([("Cat", 0.2), ("dog", 0.9), ("cat", 0.5), ("sky", 0.01)],
    ...             ProposalParams(tag_threshold=0.1, max_tags=5))
    ['dog', 'cat']
    """
    ranked = sorted(tags, key=lambda t: -t[1])  # stable: equal scores keep the tagger's order
    return _unique_labels([t for t, s in ranked if s >= params.tag_threshold])[: params.max_tags]


def filter_proposals(proposals: Sequence[Proposal], width: int, height: int,
                     params: ProposalParams) -> list[Proposal]:
    """One image's detections after clipping, score and area filters, NMS and the per-image cap.

    >>> ps = [Proposal("cat", (0, 0, 50, 50), 0.9), Proposal("cat", (2, 0, 52, 50), 0.8),
    ...       Proposal("cat", (-9, 0, 1, 1), 0.9), Proposal("dog", (60, 60, 90, 90), 0.2)]
    >>> [(p.name, p.box) for p in filter_proposals(ps, 100, 100, ProposalParams())]
    [('cat', (0.0, 0.0, 50.0, 50.0))]
    """
    if not proposals:
        return []
    boxes = clip_boxes(np.array([p.box for p in proposals], dtype=np.float64), width, height)
    scores = np.array([p.score for p in proposals], dtype=np.float64)
    frac = box_area(boxes) / float(width * height)
    ok = np.isfinite(scores) & (scores >= params.box_threshold)
    ok &= (frac >= params.min_area_frac) & (frac <= params.max_area_frac) & (frac > 0)
    idx = np.flatnonzero(ok)
    if not len(idx):
        return []
    keep = nms(boxes[idx], scores[idx], [proposals[i].name for i in idx], iou=params.nms_iou,
               ios=params.nms_ios, class_agnostic=params.class_agnostic)
    out = []
    for k in idx[keep][: params.max_per_image]:
        p = proposals[k]
        out.append(Proposal(p.name, tuple(float(v) for v in boxes[k]), float(p.score), p.origin))
    return out


def propose(
    images: Sequence[Image.Image],
    tagger: Tagger | None,
    detector: Detector,
    params: ProposalParams,
    vocabulary: Sequence[str] | None = None,
) -> list[list[Proposal]]:
    """Proposals for each image, best first (see the module docstring for the steps)."""
    images = list(images)
    if tagger is not None:
        raw = tagger.tags(images)
        if len(raw) != len(images):
            raise ValueError(f"the tagger returned {len(raw)} tag lists for {len(images)} images")
        labels = [select_tags(t, params) for t in raw]
    elif vocabulary is not None:
        vocab = _unique_labels(vocabulary)
        labels = [list(vocab) for _ in images]
    else:
        labels = [[] for _ in images]
    found = detector.detect(images, labels)
    if len(found) != len(images):
        raise ValueError(f"the detector returned {len(found)} results for {len(images)} images")
    return [filter_proposals(dets, im.width, im.height, params) for im, dets in zip(images, found, strict=True)]


# ---------------------------------------------------------------------------------------------
# backends: factories


def make_tagger(kind: str, **opts: Any) -> Tagger | None:
    """A tagger by kind: ``"none"`` (None), ``"vocabulary"`` (``vocabulary=[...]``) or
    ``"open_clip"`` (options of :class:`OpenClipTagger`).

    >>> make_tagger("vocabulary", vocabulary=["cat", "dog"]).tags([None])
    [[('cat', 1.0), ('dog', 1.0)]]
    """
    if kind == "none":
        if opts:
            raise TypeError(f"tagger 'none' takes no options, got {sorted(opts)}")
        return None
    if kind == "vocabulary":
        return VocabularyTagger(**opts)
    if kind == "open_clip":
        return OpenClipTagger(**opts)
    raise ValueError(f"unknown tagger {kind!r}; expected 'none', 'vocabulary' or 'open_clip'")


def make_detector(kind: str, **opts: Any) -> Detector:
    """A detector by kind: ``"offline"`` (:class:`ColourRegionDetector`) or ``"grounding_dino"``
    (:class:`GroundingDinoDetector`; pass ``box_threshold``/``text_threshold`` from the
    :class:`ProposalParams`).
    """
    if kind == "offline":
        return ColourRegionDetector(**opts)
    if kind == "grounding_dino":
        return GroundingDinoDetector(**opts)
    raise ValueError(f"unknown detector {kind!r}; expected 'offline' or 'grounding_dino'")


# ---------------------------------------------------------------------------------------------
# taggers


class VocabularyTagger:
    """A fixed tag list: every word for every image, score 1.0."""

    def __init__(self, vocabulary: Sequence[str]):
        self.vocabulary = _unique_labels(vocabulary)
        if not self.vocabulary:
            raise ValueError("the vocabulary tagger needs at least one word")

    def tags(self, images: Sequence[Image.Image]) -> list[list[tuple[str, float]]]:
        return [[(w, 1.0) for w in self.vocabulary] for _ in images]


class OpenClipTagger:
    """Zero-shot tags with an open_clip model: each image embedding against the text embeddings of
    ``template.format(tag)`` for every tag of ``vocabulary``.

    ``model``: an open_clip model name (then ``pretrained`` is a tag or a checkpoint file) or
    ``"local-dir:/path"`` / ``"hf-hub:org/repo"`` (weights from there). ``scoring="softmax"`` gives the softmax of the
    model's scaled cosine similarities over the vocabulary; ``"cosine"`` the raw cosine. ``top_k``
    keeps the best tags per image (all when None). Text embeddings are computed once per
    vocabulary and template, and cached.
    """

    def __init__(self, vocabulary: Sequence[str], model: str = "ViT-B-32", pretrained: str | None = None,
                 template: str = "a photo of a {}", scoring: Literal["softmax", "cosine"] = "softmax",
                 top_k: int | None = None, device: str = "cpu", batch_size: int = 32):
        if scoring not in ("softmax", "cosine"):
            raise ValueError(f"scoring must be 'softmax' or 'cosine', not {scoring!r}")
        self.vocabulary = _unique_labels(vocabulary)
        if not self.vocabulary:
            raise ValueError("the open_clip tagger needs a tag vocabulary")
        if not pretrained and not model.startswith(("local-dir:", "hf-hub:")):
            raise ValueError(f"open_clip model {model!r} needs pretrained= (a tag or a checkpoint file); "
                             "without it the weights would be random")
        self.torch = require("torch", "models", feature="the open_clip tagger")
        self.open_clip = require("open_clip", "models", feature="the open_clip tagger")
        self.model_name, self.pretrained = model, pretrained
        self.template, self.scoring, self.top_k = template, scoring, top_k
        self.device, self.batch_size = device, batch_size
        self.model, _, self.preprocess = self.open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device)
        self.model.eval()
        self.tokenizer = self.open_clip.get_tokenizer(model)
        self._text_cache: dict[tuple[tuple[str, ...], str], Any] = {}

    def text_embeddings(self, vocabulary: Sequence[str] | None = None):
        """Unit-norm text embeddings ``(len(vocabulary), D)`` of the prompts, cached."""
        vocab = tuple(self.vocabulary if vocabulary is None else vocabulary)
        key = (vocab, self.template)
        if key not in self._text_cache:
            torch = self.torch
            tokens = self.tokenizer([self.template.format(t) for t in vocab]).to(self.device)
            with torch.inference_mode():
                emb = self.model.encode_text(tokens).float()
            self._text_cache[key] = emb / emb.norm(dim=-1, keepdim=True)
        return self._text_cache[key]

    def scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``(len(images), len(vocabulary))`` tag scores."""
        torch = self.torch
        text = self.text_embeddings()
        rows = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start:start + self.batch_size]])
            with torch.inference_mode():
                emb = self.model.encode_image(batch.to(self.device)).float()
                emb = emb / emb.norm(dim=-1, keepdim=True)
                sim = emb @ text.T
                if self.scoring == "softmax":
                    sim = (self.model.logit_scale.exp().float() * sim).softmax(dim=-1)
            rows.append(sim.cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, len(self.vocabulary)))

    def tags(self, images: Sequence[Image.Image]) -> list[list[tuple[str, float]]]:
        out = []
        for row in self.scores(list(images)):
            order = np.argsort(-row, kind="stable")[: self.top_k]
            out.append([(self.vocabulary[i], float(row[i])) for i in order])
        return out


# ---------------------------------------------------------------------------------------------
# detectors: colour regions (offline)


def _components(q: np.ndarray) -> np.ndarray:
    """4-connected components of equal values in a 2-D array: ``(h, w)`` component ids 0..K-1.

    Min-label propagation between equal neighbours with pointer jumping, until nothing changes.
    """
    h, w = q.shape
    lab = np.arange(h * w, dtype=np.int64).reshape(h, w)
    eq_r = q[:, 1:] == q[:, :-1]
    eq_d = q[1:, :] == q[:-1, :]
    while True:
        new = lab.copy()
        m = np.where(eq_r, np.minimum(lab[:, 1:], lab[:, :-1]), np.iinfo(np.int64).max)
        new[:, 1:] = np.minimum(new[:, 1:], m)
        new[:, :-1] = np.minimum(new[:, :-1], m)
        m = np.where(eq_d, np.minimum(lab[1:, :], lab[:-1, :]), np.iinfo(np.int64).max)
        new[1:, :] = np.minimum(new[1:, :], m)
        new[:-1, :] = np.minimum(new[:-1, :], m)
        flat = new.ravel()
        for _ in range(4):  # pointer jumping: every label is a pixel of the same component
            flat = flat[flat]
        new = flat.reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    return np.unique(lab.ravel(), return_inverse=True)[1].reshape(h, w)


def _merge_similar(comp: np.ndarray, pix: np.ndarray, tol: float) -> np.ndarray:
    """Component ids after joining 4-adjacent components whose mean colours are within ``tol``
    (RGB distance; single linkage over the adjacency graph), renumbered 0..K-1."""
    ids = comp.ravel()
    count = np.bincount(ids)
    mean = np.stack([np.bincount(ids, weights=pix[..., c].ravel()) for c in range(3)], 1) / count[:, None]
    a = np.concatenate([comp[:, :-1].ravel(), comp[:-1, :].ravel()])
    b = np.concatenate([comp[:, 1:].ravel(), comp[1:, :].ravel()])
    pairs = np.unique(np.stack([a, b], 1)[a != b], axis=0)
    pairs = pairs[np.linalg.norm(mean[pairs[:, 0]] - mean[pairs[:, 1]], axis=1) < tol]
    if not len(pairs):
        return comp
    lab = np.arange(len(count))
    while True:  # min-label propagation over the close pairs, with pointer jumping
        new = lab.copy()
        np.minimum.at(new, pairs[:, 0], lab[pairs[:, 1]])
        np.minimum.at(new, pairs[:, 1], lab[pairs[:, 0]])
        new = new[new][new[new]]
        if np.array_equal(new, lab):
            break
        lab = new
    return np.unique(lab, return_inverse=True)[1][comp]


def _background_mask(comp: np.ndarray, frac: float) -> np.ndarray:
    """Pixels of the regions that touch the image border and hold at least ``frac`` of the image."""
    count = np.bincount(comp.ravel())
    border = np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))
    bg = border[count[border] >= frac * comp.size]
    return np.isin(comp, bg)


def _box_sums(integral: np.ndarray, x1, y1, x2, y2) -> np.ndarray:
    """Sums over ``[y1, y2) x [x1, x2)`` from an integral image with a zero first row and column."""
    return integral[y2, x2] - integral[y1, x2] - integral[y2, x1] + integral[y1, x1]


class ColourRegionDetector:
    """Class-agnostic region proposals from colour segmentation (numpy and PIL only).

    The image is shrunk to ``max_side``, median-filtered (``smooth``), and quantised to each of
    ``colors`` palette sizes (median cut). Its 4-connected regions of one palette colour are
    joined with adjacent regions whose mean colours lie within ``merge_tol`` (RGB distance; 0
    switches merging off), and every region with at least ``min_region_frac`` of the pixels
    becomes a box labelled ``label``. With ``foreground``, the regions that touch the border and
    hold at least ``background_frac`` of the image are background, and each connected blob of the
    rest becomes a box too (whole multi-coloured objects). A box's score is
    ``contrast * sqrt(fill)``: ``contrast = 1 - exp(-d / 50)`` with ``d`` the RGB distance between
    the region's mean colour and the mean colour of a ring around its box (0 when the box covers
    the image), ``fill`` the region's share of its box. Labels passed to :meth:`detect` are ignored.
    At most ``max_regions`` boxes per palette size, best first.
    """

    def __init__(self, max_side: int = 256, colors: Sequence[int] = (8, 24), smooth: int = 3,
                 merge_tol: float = 24.0, min_region_frac: float = 0.0005, max_regions: int = 200,
                 foreground: bool = True, background_frac: float = 0.1, label: str = "object"):
        self.foreground, self.background_frac = foreground, background_frac
        self.max_side, self.colors, self.smooth, self.merge_tol = max_side, tuple(colors), smooth, merge_tol
        self.min_region_frac, self.max_regions, self.label = min_region_frac, max_regions, label

    def detect(self, images: Sequence[Image.Image], labels: Sequence[Sequence[str]] | None = None
               ) -> list[list[Proposal]]:
        return [self.regions(im) for im in images]

    def regions(self, image: Image.Image) -> list[Proposal]:
        """The proposals of one image."""
        rgb = image.convert("RGB")
        W, H = rgb.size
        scale = min(1.0, self.max_side / max(W, H))
        w, h = max(1, round(W * scale)), max(1, round(H * scale))
        small = rgb.resize((w, h), Image.Resampling.BOX) if (w, h) != (W, H) else rgb
        if self.smooth > 1:
            small = small.filter(ImageFilter.MedianFilter(self.smooth))
        pix = np.asarray(small, dtype=np.float64)
        integral = np.zeros((h + 1, w + 1, 3))
        integral[1:, 1:] = pix.cumsum(0).cumsum(1)
        sx, sy = W / w, H / h
        out: list[Proposal] = []
        for k in self.colors:
            q = np.asarray(small.quantize(colors=k, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE))
            comp = _merge_similar(_components(q), pix, self.merge_tol) if self.merge_tol > 0 else _components(q)
            out.extend(self._score_regions(comp, pix, integral, sx, sy))
            if self.foreground:
                fg = ~_background_mask(comp, self.background_frac)
                if fg.any():
                    blobs = np.where(fg, _components(fg), -1)
                    out.extend(self._score_regions(np.unique(blobs, return_inverse=True)[1].reshape(h, w),
                                                   pix, integral, sx, sy, skip_first=not fg.all()))
        return out

    def _score_regions(self, comp: np.ndarray, pix: np.ndarray, integral: np.ndarray,
                       sx: float, sy: float, skip_first: bool = False) -> list[Proposal]:
        h, w = comp.shape
        ids = comp.ravel()
        count = np.bincount(ids)
        big = np.flatnonzero(count >= max(4, self.min_region_frac * h * w))
        if skip_first:  # id 0 is the background of a foreground-blob map
            big = big[big > 0]
        if not len(big):
            return []
        ys, xs = np.divmod(np.arange(h * w), w)
        order = np.argsort(ids, kind="stable")
        starts = np.concatenate([[0], np.cumsum(count)[:-1]])
        x1 = np.minimum.reduceat(xs[order], starts)[big]
        x2 = np.maximum.reduceat(xs[order], starts)[big] + 1
        y1 = np.minimum.reduceat(ys[order], starts)[big]
        y2 = np.maximum.reduceat(ys[order], starts)[big] + 1
        flat = pix.reshape(-1, 3)
        inside = np.stack([np.bincount(ids, weights=flat[:, c]) for c in range(3)], 1)[big] / count[big, None]
        bw, bh = x2 - x1, y2 - y1
        m = np.maximum(1, np.round(0.15 * np.maximum(bw, bh))).astype(np.int64)
        ex1, ey1 = np.maximum(0, x1 - m), np.maximum(0, y1 - m)
        ex2, ey2 = np.minimum(w, x2 + m), np.minimum(h, y2 + m)
        ring_area = (ex2 - ex1) * (ey2 - ey1) - bw * bh
        ring_sum = _box_sums(integral, ex1, ey1, ex2, ey2) - _box_sums(integral, x1, y1, x2, y2)
        ring = ring_sum / np.maximum(ring_area, 1)[:, None]
        dist = np.linalg.norm(inside - ring, axis=1)
        contrast = np.where(ring_area > 0, 1.0 - np.exp(-dist / 50.0), 0.0)
        fill = count[big] / (bw * bh)
        score = contrast * np.sqrt(fill)
        best = np.argsort(-score, kind="stable")[: self.max_regions]
        return [Proposal(self.label, (float(x1[i] * sx), float(y1[i] * sy), float(x2[i] * sx), float(y2[i] * sy)),
                         float(score[i])) for i in best]


# ---------------------------------------------------------------------------------------------
# detectors: GroundingDINO (transformers)


def grounding_prompt(labels: Sequence[str]) -> str:
    """GroundingDINO's text prompt: lowercase phrases, each ending with ``" ."``.

    >>> grounding_prompt(["Cat", "traffic light."])
    'cat . traffic light .'
    """
    return " ".join(f"{_clean_label(x)} ." for x in labels)


_WORD = re.compile(r"[a-z0-9]+")


def match_label(phrase: str, labels: Sequence[str]) -> str | None:
    """The label a GroundingDINO phrase stands for: the label itself when the phrase is one,
    else the label sharing most words with it (Jaccard; the earlier label on ties); None (the
    detection is dropped) when it shares no word with any label.

    >>> labels = ["cat", "traffic light", "light"]
    >>> match_label("traffic light", labels), match_label("cat. traffic", labels), match_label("dog", labels)
    ('traffic light', 'cat', None)
    """
    clean = _clean_label(phrase)
    if clean in labels:
        return clean
    words = set(_WORD.findall(clean))
    best, best_j = None, 0.0
    for label in labels:
        lw = set(_WORD.findall(label))
        j = len(words & lw) / len(words | lw) if words | lw else 0.0
        if j > best_j:
            best, best_j = label, j
    return best


class GroundingDinoDetector:
    """Open-vocabulary boxes with transformers' GroundingDINO.

    ``model``: a local directory or hub id holding the model and its processor. Images of one size
    are run ``batch_size`` at a time (mixed sizes would be padded, and padding changes what the
    model sees), each with its own prompt (:func:`grounding_prompt`); a label list whose
    prompt exceeds the model's ``max_text_len`` tokens is split into several passes whose
    detections are concatenated (NMS runs later, in :func:`filter_proposals`). Boxes come back in
    pixels of the original image. Phrases map to labels by :func:`match_label`; unmatched ones are
    dropped. ``dtype``: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
    """

    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32", box_threshold: float = 0.35,
                 text_threshold: float = 0.25, batch_size: int = 4, max_text_len: int | None = None):
        self.torch = require("torch", "models", feature="the grounding_dino detector")
        transformers = require("transformers", "models", feature="the grounding_dino detector")
        self.dtype = getattr(self.torch, dtype)
        self.device, self.batch_size = device, batch_size
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.processor = transformers.AutoProcessor.from_pretrained(model)
        self.model = transformers.GroundingDinoForObjectDetection.from_pretrained(model)
        self.model.to(device=device, dtype=self.dtype).eval()
        self.max_text_len = max_text_len or int(self.model.config.max_text_len)
        params = inspect.signature(self.processor.post_process_grounded_object_detection).parameters
        self._threshold_kw = "threshold" if "threshold" in params else "box_threshold"

    def _n_tokens(self, label: str) -> int:
        return len(self.processor.tokenizer(f"{label} .", add_special_tokens=False)["input_ids"])

    def chunks(self, labels: Sequence[str]) -> list[list[str]]:
        """``labels`` packed in order into lists whose prompts fit ``max_text_len`` tokens."""
        budget = self.max_text_len - 2  # [CLS] and [SEP]
        out: list[list[str]] = []
        used = math.inf
        for label in _unique_labels(labels):
            n = self._n_tokens(label)
            if used + n > budget:
                out.append([])
                used = 0
            out[-1].append(label)
            used += n
        return out

    def detect(self, images: Sequence[Image.Image], labels: Sequence[Sequence[str]]) -> list[list[Proposal]]:
        images = list(images)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} label lists")
        work = [(i, chunk) for i, ls in enumerate(labels) for chunk in self.chunks(ls)]
        groups: dict[tuple[int, int], list[tuple[int, list[str]]]] = {}
        for item in work:  # one image size per batch: padded pixels would change the outputs
            groups.setdefault(images[item[0]].size, []).append(item)
        found: list[list[Proposal]] = [[] for _ in images]
        for group in groups.values():
            for start in range(0, len(group), self.batch_size):
                batch = group[start:start + self.batch_size]
                dets = self._run([images[i].convert("RGB") for i, _ in batch], [c for _, c in batch])
                for (i, _), d in zip(batch, dets, strict=True):
                    found[i].extend(d)
        return found

    def _run(self, images: list[Image.Image], label_lists: list[list[str]]) -> list[list[Proposal]]:
        torch = self.torch
        inputs = self.processor(images=images, text=[grounding_prompt(ls) for ls in label_lists],
                                return_tensors="pt", padding="longest", truncation=True,
                                max_length=self.max_text_len)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        results = self.processor.post_process_grounded_object_detection(
            outputs, input_ids=inputs["input_ids"], text_threshold=self.text_threshold,
            target_sizes=[(im.height, im.width) for im in images], **{self._threshold_kw: self.box_threshold})
        out = []
        for im, ls, res in zip(images, label_lists, results, strict=True):
            phrases = res["text_labels"] if "text_labels" in res else res["labels"]
            dets = []
            for box, score, phrase in zip(res["boxes"].tolist(), res["scores"].tolist(), phrases,
                                          strict=True):
                label = match_label(phrase, ls)
                if label is None:
                    continue
                dets.append(Proposal(label, clip_boxes(box, im.width, im.height), float(score)))
            out.append(dets)
        return out
