"""Scorers of the filters stage: the measurements FineCops-Ref filters its edited negatives with.

* CLIP (:class:`ClipScorer`, :func:`clip_margin_image`, :func:`clip_margin_text`): a negative must
  fit its text less than the positive does.
* DINOv2 (:class:`DinoScorer`, :func:`best_of_n`): of the N inpainting candidates of one edit,
  keep the one most similar to the original image.
* DIRE (:class:`DireScorer`): DIffusion Reconstruction Error (Wang et al., ICCV 2023): an image is
  DDIM-inverted to noise and DDIM-reconstructed; generated images reconstruct better than real
  ones. FineCops-Ref drops edited images scoring above 0.2.
* offline stand-ins (:func:`outside_change`, :func:`masked_change`, :func:`seam_score`): numpy
  measurements of an edit against its mask. They are not CLIP, DINOv2 or DIRE and do not pretend
  to be: each measures exactly what its name says.

Everything works on PIL images (and numpy arrays for the offline functions); nothing here reads
or writes tables. torch, torchvision, open_clip, transformers and diffusers (the ``models`` extra)
are imported inside the model classes, so importing this module needs numpy and PIL only.

Model classes load their model once, run batched under ``torch.inference_mode()`` and return
float32 numpy arrays. ``dtype="auto"`` is float16 on CUDA and float32 elsewhere; ``"fp16"``,
``"bf16"`` and ``"fp32"`` force one. Identical images in one call are embedded once (by content
hash), so they get bit-identical embeddings whatever the batch boundaries.

>>> import numpy as np
>>> a = np.zeros((8, 8, 3), np.uint8); b = a.copy(); b[2:5, 2:5] = 255
>>> m = np.zeros((8, 8), bool); m[2:5, 2:5] = True
>>> outside_change(a, b, m), masked_change(a, b, m), masked_change(a, a, m)
(0.0, 1.0, 0.0)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from refforge.optional import require

__all__ = [
    "ClipScorer",
    "DinoScorer",
    "DireScorer",
    "best_of_n",
    "clip_margin_image",
    "clip_margin_text",
    "make_scorer",
    "masked_change",
    "outside_change",
    "seam_score",
]


# ---------------------------------------------------------------------------------------------
# shared helpers


def _torch_dtype(torch: Any, device: str, dtype: str):
    """``"auto"``: float16 on CUDA, float32 elsewhere; else ``fp16``/``bf16``/``fp32`` (or torch names)."""
    names = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if dtype not in names:
        raise ValueError(f"dtype must be 'auto', 'fp16', 'bf16' or 'fp32', not {dtype!r}")
    return names[dtype]


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


def _dedup(images: Sequence[Image.Image]) -> tuple[list[Image.Image], np.ndarray]:
    """The distinct images (by mode, size and pixel bytes; first occurrence order) and, for each
    input, the index of its distinct image."""
    index: dict[tuple, int] = {}
    unique: list[Image.Image] = []
    inverse = np.empty(len(images), dtype=np.int64)
    for i, im in enumerate(images):
        key = (im.mode, im.size, hashlib.blake2b(im.tobytes(), digest_size=16).digest())
        if key not in index:
            index[key] = len(unique)
            unique.append(im)
        inverse[i] = index[key]
    return unique, inverse


def _prepared(items: Sequence[Any], size: int, prep, workers: int):
    """Batches of ``[prep(item), ...]``, ``size`` items each; the next batch is prepared on ``workers``
    threads while the caller runs the model on the current one (PIL resizing releases the GIL), so
    preprocessing and the forward pass overlap instead of taking turns."""
    chunks = [items[s:s + size] for s in range(0, len(items), size)]
    if not chunks:
        return
    if workers <= 1:
        for c in chunks:
            yield [prep(x) for x in c]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="refforge-prep") as pool:
        futures = [pool.submit(prep, x) for x in chunks[0]]
        for k in range(len(chunks)):
            ready = [f.result() for f in futures]
            futures = [pool.submit(prep, x) for x in chunks[k + 1]] if k + 1 < len(chunks) else []
            yield ready


def _prep_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1)))


PREP_THREADS_MIN_PIXELS = 256 * 256
"""Images smaller than this are prepared in turn: a thread pool costs more than resizing them
(measured in benchmarks/bench_inpaint.py: threads halved the tiny models' throughput at 128x96)."""


def _workers_for(images: Sequence[Image.Image], workers: int) -> int:
    return workers if images and images[0].width * images[0].height >= PREP_THREADS_MIN_PIXELS else 1


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _check_lengths(**seqs: Sequence) -> int:
    lengths = {k: len(v) for k, v in seqs.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"lengths differ: {lengths}")
    return next(iter(lengths.values()), 0)


# ---------------------------------------------------------------------------------------------
# CLIP


class ClipScorer:
    """Image and text embeddings of an open_clip model.

    ``model``: an open_clip model name (``"ViT-L-14"``; then ``pretrained`` is a tag such as
    ``"openai"`` or a checkpoint file), ``"hf-hub:org/repo"``, ``"local-dir:/path"`` or a local
    folder (an open_clip config plus weights; ``pretrained`` is ignored for these). Loading is
    :class:`refforge.stages.proposals.detectors.OpenClipTagger`'s: ``create_model_and_transforms``
    plus ``get_tokenizer``, and a name without ``pretrained`` is refused (random weights).
    Text embeddings are cached per text for the life of the scorer.
    """

    def __init__(self, model: str, pretrained: str | None = None, device: str = "cpu", batch_size: int = 32,
                 dtype: str = "auto"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if not model.startswith(("local-dir:", "hf-hub:")) and os.path.isdir(model):
            model = "local-dir:" + model
        if not pretrained and not model.startswith(("local-dir:", "hf-hub:")):
            raise ValueError(f"open_clip model {model!r} needs pretrained= (a tag or a checkpoint file); "
                             "without it the weights would be random")
        self.torch = torch = require("torch", "models", feature="the CLIP scorer")
        open_clip = require("open_clip", "models", feature="the CLIP scorer")
        self.device, self.batch_size = device, batch_size
        self.prep_workers = _prep_workers()  # threads preparing the next batch (set 1 to prepare in turn)
        self.dtype = _torch_dtype(torch, device, dtype)
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[self.dtype]
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device, precision=precision)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.dim = int(getattr(self.model.visual, "output_dim", 0) or 0)
        self._text_cache: dict[str, np.ndarray] = {}

    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``(N, D)`` unit-norm float32 image embeddings, ``batch_size`` images per forward pass."""
        torch = self.torch
        unique, inverse = _dedup(_rgb(images))
        rows = []
        for prepared in _prepared(unique, self.batch_size, self.preprocess, _workers_for(unique, self.prep_workers)):
            batch = torch.stack(prepared)
            with torch.inference_mode():
                emb = self.model.encode_image(batch.to(self.device, self.dtype)).float()
            rows.append(emb.cpu().numpy())
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalise_rows(np.concatenate(rows))[inverse]

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, D)`` unit-norm float32 text embeddings; each distinct text is encoded once per scorer."""
        torch = self.torch
        todo = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            with torch.inference_mode():
                emb = self.model.encode_text(self.tokenizer(chunk).to(self.device)).float()
            for text, row in zip(chunk, _normalise_rows(emb.cpu().numpy()), strict=True):
                self._text_cache[text] = row
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._text_cache[t] for t in texts])

    def pair_scores(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """``(N,)`` cosine similarity of ``images[i]`` and ``texts[i]``."""
        _check_lengths(images=images, texts=texts)
        return np.sum(self.image_embeddings(images) * self.text_embeddings(texts), axis=1)


def clip_margin_image(scorer: ClipScorer, originals: Sequence[Image.Image], edited: Sequence[Image.Image],
                      texts: Sequence[str]) -> np.ndarray:
    """Image negatives: ``cos(text_i, original_i) - cos(text_i, edited_i)`` per item.

    Positive: the positive text fits the edited image less than the original (the edit worked);
    exactly 0 when the edited image equals the original (both are embedded once, together).
    """
    n = _check_lengths(originals=originals, edited=edited, texts=texts)
    emb = scorer.image_embeddings(list(originals) + list(edited))
    txt = scorer.text_embeddings(texts)
    return np.sum(txt * emb[:n], axis=1) - np.sum(txt * emb[n:], axis=1)


def clip_margin_text(scorer: ClipScorer, images: Sequence[Image.Image], positive_texts: Sequence[str],
                     negative_texts: Sequence[str]) -> np.ndarray:
    """Text negatives: ``cos(positive_i, image_i) - cos(negative_i, image_i)`` per item.

    Negative values: CLIP prefers the negative text for the image (the negative is suspicious:
    it may describe the image after all). Swapping the two text lists negates the result exactly.
    """
    _check_lengths(images=images, positive_texts=positive_texts, negative_texts=negative_texts)
    img = scorer.image_embeddings(images)
    return np.sum(img * scorer.text_embeddings(positive_texts), axis=1) - \
        np.sum(img * scorer.text_embeddings(negative_texts), axis=1)


# ---------------------------------------------------------------------------------------------
# DINOv2


class DinoScorer:
    """Image embeddings of a transformers ``Dinov2Model`` (a hub id or a saved folder, with its
    image processor).

    The embedding is ``pooler_output``: the CLS token after the final layer norm. DINOv2 trains
    that token with its image-level (DINO) objective and its authors use it, normalised, for
    k-NN retrieval and linear probes; the mean of the patch tokens is the iBOT/patch-level side.
    Best-of-N asks which candidate is most like the original image as a whole, so the CLS token.
    """

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 32, dtype: str = "auto"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.torch = torch = require("torch", "models", feature="the DINOv2 scorer")
        transformers = require("transformers", "models", feature="the DINOv2 scorer")
        self.device, self.batch_size = device, batch_size
        self.prep_workers = _prep_workers()  # threads preparing the next batch (set 1 to prepare in turn)
        self.dtype = _torch_dtype(torch, device, dtype)
        self.processor = transformers.AutoImageProcessor.from_pretrained(model)
        self.model = transformers.Dinov2Model.from_pretrained(model).to(device=device, dtype=self.dtype).eval()
        self.dim = int(self.model.config.hidden_size)

    def embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``(N, D)`` unit-norm float32 CLS embeddings, ``batch_size`` images per forward pass."""
        torch = self.torch
        unique, inverse = _dedup(_rgb(images))
        rows = []

        def prep(im):
            return self.processor(images=im, return_tensors="pt")["pixel_values"][0]

        for prepared in _prepared(unique, self.batch_size, prep, _workers_for(unique, self.prep_workers)):
            pixels = torch.stack(prepared)
            with torch.inference_mode():
                out = self.model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output.float()
            rows.append(out.cpu().numpy())
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalise_rows(np.concatenate(rows))[inverse]


def best_of_n(original: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, int]:
    """Cosine similarity of each candidate embedding ``(N, D)`` to the original's ``(D,)``, and the
    index of the most similar one (the first of equals).

    >>> sims, best = best_of_n(np.array([1.0, 0.0]), np.array([[0.0, 1.0], [2.0, 0.1], [1.0, 1.0]]))
    >>> best, [round(float(s), 3) for s in sims]
    (1, [0.0, 0.999, 0.707])
    """
    original = np.asarray(original, dtype=np.float32).reshape(-1)
    candidates = np.asarray(candidates, dtype=np.float32)
    if candidates.ndim != 2 or candidates.shape[1] != original.shape[0]:
        raise ValueError(f"candidates must be (N, {original.shape[0]}), got {candidates.shape}")
    if not len(candidates):
        raise ValueError("best_of_n needs at least one candidate")
    sims = _normalise_rows(candidates) @ _normalise_rows(original)
    return sims, int(np.argmax(sims))


# ---------------------------------------------------------------------------------------------
# DIRE


class DireScorer:
    """DIRE: DDIM inversion to noise, DDIM reconstruction back, error map ``|x - recon|``.

    ``model``: a diffusers pipeline folder, told apart by its ``model_index.json``:

    * pixel space (like DIRE's ADM): ``unet`` a ``UNet2DModel`` (unconditional), no ``vae``;
      e.g. a ``DDIMPipeline``/``DDPMPipeline`` folder; a UNet with twice the image channels out
      (ADM's learned variance) has its second half dropped, as guided-diffusion splits it;
    * latent space (Stable-Diffusion style): ``unet`` a ``UNet2DConditionModel``, ``vae`` an
      ``AutoencoderKL``, ``text_encoder`` + ``tokenizer``; conditioned on the empty prompt, the
      image encoded with the VAE posterior mean (deterministic), the error measured in pixels
      after decoding. Two-text-encoder (SDXL) folders are refused.

    The scheduler folder supplies the noise schedule (``alphas_cumprod``, prediction type,
    clipping), read as a ``DDIMScheduler``; ``steps`` DDIM steps each way (2 x ``steps`` UNet
    passes per batch). Inversion is written here, after guided-diffusion's
    ``ddim_reverse_sample`` that DIRE's ``compute_dire.py`` calls: from level ``t`` to the next,
    the model is evaluated at ``(x_t, t)``; the clean image counts as timestep 0. Reconstruction is
    plain DDIM (eta 0) over the same timesteps. With ``clip_sample`` in the scheduler config, the
    predicted clean image is clipped and the noise recomputed from it (guided-diffusion's
    ``clip_denoised``, which DIRE uses).

    Images are resized (bicubic, no crop) to ``size`` x ``size`` in [-1, 1]. The error map is
    ``|x - recon| / 2`` (DIRE's ``dire * 255 / 2`` before its uint8 cast), averaged over the
    colour channels and resized back to the image's size: HxW float in 0..1.

    Score: without ``classifier``, the mean of the error (0..1; larger = the model reconstructs
    the image worse = more natural to it). With ``classifier`` (a DIRE checkpoint: torchvision
    ResNet-50 with a 1-logit fc, state dict under ``"model"``; see :meth:`_load_classifier`), the
    sigmoid of its logit on the 3-channel error image, prepared like DIRE's ``demo.py``: uint8
    quantisation, resize 256, centre crop 224, ImageNet mean/std. That is the probability that the
    image is generated (the score FineCops-Ref thresholds at 0.2).
    """

    def __init__(self, model: str, device: str = "cpu", steps: int = 20, size: int = 256,
                 classifier: str | None = None, batch_size: int = 8, dtype: str = "auto"):
        if steps < 1 or batch_size < 1 or size < 8:
            raise ValueError(f"need steps >= 1, batch_size >= 1 and size >= 8; got {steps}, {batch_size}, {size}")
        self.torch = torch = require("torch", "models", feature="the DIRE scorer")
        diffusers = require("diffusers", "models", feature="the DIRE scorer")
        self.device, self.steps, self.size, self.batch_size = device, steps, size, batch_size
        self.dtype = _torch_dtype(torch, device, dtype)
        root = Path(model)
        index_path = root / "model_index.json"
        if not index_path.is_file():
            raise ValueError(f"DIRE model {model!r} is not a diffusers pipeline folder (no model_index.json)")
        index = json.loads(index_path.read_text())

        def component(name: str) -> str | None:
            entry = index.get(name)
            return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else None

        unet_class, vae_class = component("unet"), component("vae")
        if unet_class is None:
            raise ValueError(f"DIRE model {model!r} has no unet in model_index.json")
        if component("text_encoder_2") is not None:
            raise ValueError(f"DIRE model {model!r} has two text encoders (SDXL-style); only single-encoder "
                             "latent models (Stable Diffusion 1.x/2.x style) are supported")
        self.kind = "latent" if vae_class is not None else "pixel"
        if self.kind == "pixel" and unet_class != "UNet2DModel":
            raise ValueError(f"DIRE model {model!r}: a pixel-space model needs a UNet2DModel, not {unet_class}")
        self.scheduler = diffusers.DDIMScheduler.from_pretrained(root, subfolder="scheduler")
        unet_cls = getattr(diffusers, unet_class)
        self.unet = unet_cls.from_pretrained(root, subfolder="unet").to(device=device, dtype=self.dtype).eval()
        self.vae = None
        self._context = None
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if self.kind == "latent":
            transformers = require("transformers", "models", feature="the DIRE scorer (latent models)")
            self.vae = getattr(diffusers, vae_class).from_pretrained(root, subfolder="vae").to(
                device=device, dtype=self.dtype).eval()
            factor *= 2 ** (len(self.vae.config.block_out_channels) - 1)
            tokenizer = transformers.AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
            text_encoder = getattr(transformers, component("text_encoder") or "CLIPTextModel").from_pretrained(
                root, subfolder="text_encoder").to(device=device, dtype=self.dtype).eval()
            ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            with torch.inference_mode():
                self._context = text_encoder(ids)[0]
            del text_encoder
        if size % factor:
            raise ValueError(f"size {size} must be a multiple of {factor} for this model")
        self.scheduler.set_timesteps(steps)
        self.timesteps = sorted({int(t) for t in self.scheduler.timesteps.tolist()})
        self.alphas = self.scheduler.alphas_cumprod.to(torch.float64)
        self.clean_alpha = float(self.scheduler.final_alpha_cumprod)
        self.classifier = self._load_classifier(classifier) if classifier else None

    # -- the classifier --------------------------------------------------------------------

    def _load_classifier(self, path: str):
        """A DIRE checkpoint: ``torch.save({"model": state_dict, "optimizer": ..., "total_steps": ...})``
        (ZhendongWang6/DIRE ``utils/trainer.py`` ``save_networks``); ``demo.py`` also accepts a bare
        state dict. The network is DIRE's ``networks/resnet.py`` ``resnet50(num_classes=1)``, whose
        parameter names and shapes are torchvision's ``resnet50``, fc 2048 -> 1. A ``module.``
        prefix (DataParallel) is dropped. Anything else: one ``ValueError`` line."""
        torch = self.torch
        torchvision = require("torchvision", "models", feature="the DIRE classifier")
        what = ("not a DIRE classifier checkpoint (expected a torchvision ResNet-50 state dict with a "
                "1-logit fc, under the key 'model')")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise ValueError(f"{path}: {what}: cannot load it ({type(e).__name__})") from None
        state = obj.get("model", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: {what}: found no state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        net = torchvision.models.resnet50(weights=None, num_classes=1)
        expected = net.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            parts = [f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
                     f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
                     f"wrong shapes for {', '.join(wrong[:3])}" if wrong else ""]
            raise ValueError(f"{path}: {what}: " + "; ".join(p for p in parts if p))
        net.load_state_dict(state)
        return net.to(device=self.device, dtype=self.dtype).eval()

    # -- diffusion -------------------------------------------------------------------------

    def _eps_x0(self, x, out, alpha: float):
        """``(x0, eps)`` from the model output at noise level ``alpha`` (prediction type of the
        scheduler; clipping with guided-diffusion's noise recomputation)."""
        cfg = self.scheduler.config
        a, b = math.sqrt(alpha), math.sqrt(1.0 - alpha)
        if cfg.prediction_type == "epsilon":
            eps, x0 = out, (x - b * out) / a
        elif cfg.prediction_type == "v_prediction":
            x0, eps = a * x - b * out, a * out + b * x
        elif cfg.prediction_type == "sample":
            x0, eps = out, (x - a * out) / max(b, 1e-8)
        else:
            raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
        if cfg.clip_sample and self.kind == "pixel":
            r = float(cfg.clip_sample_range)
            x0 = x0.clamp(-r, r)
            if b > 1e-6:  # at the clean level (alpha 1) the noise is the model's own
                eps = (x - a * x0) / b
        return x0, eps

    def _model(self, x, t: int):
        torch = self.torch
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if self._context is None:
            out = self.unet(x, tt).sample
        else:
            out = self.unet(x, tt, encoder_hidden_states=self._context.expand(x.shape[0], *self._context.shape[1:])).sample
        if out.shape[1] == 2 * x.shape[1]:  # learned variance (ADM's learn_sigma): the first half is the noise
            out = out[:, :x.shape[1]]
        return out

    def _invert(self, x):
        level_a, level_t = self.clean_alpha, 0
        for t in self.timesteps:
            x0, eps = self._eps_x0(x, self._model(x, level_t), level_a)
            a = float(self.alphas[t])
            x = math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps
            level_a, level_t = a, t
        return x

    def _reconstruct(self, x):
        desc = self.timesteps[::-1]
        for i, t in enumerate(desc):
            a = float(self.alphas[t])
            x0, eps = self._eps_x0(x, self._model(x, t), a)
            a_next = float(self.alphas[desc[i + 1]]) if i + 1 < len(desc) else self.clean_alpha
            x = math.sqrt(a_next) * x0 + math.sqrt(1.0 - a_next) * eps
        return x

    def reconstruct(self, pixels):
        """Reconstruction of a batch ``(B, 3, size, size)`` in [-1, 1] (same shape, clamped)."""
        if self.vae is None:
            return self._reconstruct(self._invert(pixels)).clamp(-1, 1)
        cfg = self.vae.config
        scale = float(cfg.scaling_factor)
        shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        z = (self.vae.encode(pixels).latent_dist.mean - shift) * scale
        z = self._reconstruct(self._invert(z))
        return self.vae.decode(z / scale + shift).sample.clamp(-1, 1)

    def _pixels(self, images: Sequence[Image.Image]):
        torch = self.torch
        arr = np.stack([np.asarray(im.resize((self.size, self.size), Image.Resampling.BICUBIC), dtype=np.float32)
                        for im in images])
        return torch.from_numpy(arr / 127.5 - 1.0).permute(0, 3, 1, 2).to(self.device, self.dtype)

    def _classify(self, err):
        """Sigmoid probabilities of the classifier on the 3-channel error ``(B, 3, S, S)`` in 0..1."""
        torch = self.torch
        from torchvision.transforms import functional as tvf

        img = torch.floor(err.float() * 255.0) / 255.0  # DIRE saves (dire * 255 / 2).to(uint8)
        img = tvf.center_crop(tvf.resize(img, 256, antialias=True), 224)
        img = tvf.normalize(img, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        return self.classifier(img.to(self.dtype)).float().sigmoid().reshape(-1)

    def score(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(scores (N,), error maps)``: one HxW float32 map in 0..1 per image, at its own size."""
        torch = self.torch
        images = _rgb(images)
        scores: list[float] = []
        maps: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            with torch.inference_mode():
                x = self._pixels(chunk)
                err = ((x - self.reconstruct(x)).abs().float() / 2.0).clamp(0, 1)
                if self.classifier is not None:
                    scores.extend(self._classify(err).cpu().tolist())
                else:
                    scores.extend(err.mean(dim=(1, 2, 3)).cpu().tolist())
                small = err.mean(dim=1).cpu().numpy()
            for im, m in zip(chunk, small, strict=True):
                full = np.asarray(Image.fromarray(m, mode="F").resize(im.size, Image.Resampling.BILINEAR))
                maps.append(np.clip(full, 0.0, 1.0).astype(np.float32))
        return np.asarray(scores, dtype=np.float32), maps


# ---------------------------------------------------------------------------------------------
# offline stand-ins (numpy only)


def _as_float(image) -> np.ndarray:
    """HxWxC float64 in 0..1 from a PIL image or an array (uint8 0..255, or float already 0..1)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    a = a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)
    return a[..., None] if a.ndim == 2 else a


def _as_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L")) > 0
    m = np.asarray(mask)
    m = m > (0 if m.dtype == np.uint8 else 0.5) if m.dtype != bool else m
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} does not match the image's {shape}")
    return m


def _pair(original, edited, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    o, e = _as_float(original), _as_float(edited)
    if o.shape != e.shape:
        raise ValueError(f"original {o.shape} and edited {e.shape} differ in shape")
    return o, e, _as_mask(mask, o.shape[:2])


def _abs_sums(original, edited, mask) -> tuple[float, int, float, int]:
    """(sum of |edited - original| inside the mask, its pixel-channel count, the same outside), on the
    0..1 scale; uint8 images are compared in uint8 (the inside only over the mask's bounding box)."""
    if isinstance(original, Image.Image):
        original = np.asarray(original.convert("RGB"))
    if isinstance(edited, Image.Image):
        edited = np.asarray(edited.convert("RGB"))
    o, e = np.asarray(original), np.asarray(edited)
    if o.shape != e.shape:
        raise ValueError(f"original {o.shape} and edited {e.shape} differ in shape")
    m = _as_mask(mask, o.shape[:2])
    if o.dtype == np.uint8 and e.dtype == np.uint8:
        d = cv2.absdiff(np.ascontiguousarray(e), np.ascontiguousarray(o))
        scale = 255.0
    else:
        d = np.abs(_as_float(e) - _as_float(o))
        scale = 1.0
    d = d[..., None] if d.ndim == 2 else d
    channels = d.shape[-1]
    n_in = int(m.sum())
    inside = 0.0
    if n_in:
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        inside = float(d[sl][m[sl]].sum(dtype=np.float64))
    total = float(d.sum(dtype=np.float64))
    return inside / scale, n_in * channels, (total - inside) / scale, (m.size - n_in) * channels


def outside_change(original, edited, mask) -> float:
    """Mean absolute pixel change outside the mask, 0..1 (channels averaged): 0 when the edit
    stayed inside its mask; 0 too when the mask covers the whole image (nothing is outside)."""
    _, _, out, n_out = _abs_sums(original, edited, mask)
    return out / n_out if n_out else 0.0


def masked_change(original, edited, mask) -> float:
    """Mean absolute pixel change inside the mask, 0..1 (channels averaged): near 0 means the
    edit did nothing where it should have acted; 0 for an empty mask."""
    inside, n_in, _, _ = _abs_sums(original, edited, mask)
    return inside / n_in if n_in else 0.0


def _shift_or(m: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1) square (Chebyshev radius r), zero outside the image."""
    out = m.copy()
    h, w = m.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy == dx == 0:
                continue
            out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] |= \
                m[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _gradient_magnitude(a: np.ndarray) -> np.ndarray:
    gray = a.mean(axis=-1)
    gy, gx = np.gradient(gray) if min(gray.shape) > 1 else (np.zeros_like(gray), np.zeros_like(gray))
    return np.hypot(gx, gy)


def seam_score(original, edited, mask, width: int = 2, eps: float = 0.01) -> float:
    """How visible the mask's boundary is in the edited image, relative to the original.

    The band is every pixel within ``width`` pixels (Chebyshev distance) of the boundary, on
    either side: ``dilate(mask, width) & ~erode(mask, width)``. The score is
    ``(mean |grad| of the edited image on the band + eps) / (same for the original + eps)``, with
    ``|grad|`` the central-difference gradient magnitude of the channel mean (units: 0..1 per
    pixel) and ``eps`` keeping flat originals finite. 1.0: the boundary is as smooth/textured as
    in the original (an unedited image scores exactly 1); well above 1: a visible seam (a pasted
    patch); below 1: the edit smoothed the boundary. 1.0 when the band is empty (empty or full mask).

    >>> o = np.full((20, 20, 3), 128, np.uint8); m = np.zeros((20, 20), bool); m[5:15, 5:15] = True
    >>> e = o.copy(); e[m] = 0
    >>> seam_score(o, o, m), round(seam_score(o, e, m), 1)
    (1.0, 13.2)
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, not {width}")
    o, e, m = _pair(original, edited, mask)
    if m.any():  # only the mask's bounding box grown by width + 1 matters (same numbers, less work)
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        g = width + 1
        sl = (slice(max(rows[0] - g, 0), rows[-1] + 1 + g), slice(max(cols[0] - g, 0), cols[-1] + 1 + g))
        o, e, m = o[sl], e[sl], m[sl]
    band = _shift_or(m, width) & _shift_or(~m, width)
    if not band.any():
        return 1.0
    go, ge = _gradient_magnitude(o)[band].mean(), _gradient_magnitude(e)[band].mean()
    return float((ge + eps) / (go + eps))


# ---------------------------------------------------------------------------------------------
# factory


def make_scorer(name: str, **opts: Any):
    """A scorer by name: ``"clip"`` (:class:`ClipScorer`), ``"dinov2"`` (:class:`DinoScorer`) or
    ``"dire"`` (:class:`DireScorer`), with that class's options."""
    classes = {"clip": ClipScorer, "dinov2": DinoScorer, "dire": DireScorer}
    if name not in classes:
        raise ValueError(f"unknown scorer {name!r}; expected one of {sorted(classes)}")
    return classes[name](**opts)
