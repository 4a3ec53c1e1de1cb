"""Tiny random-initialised models for the filters' scorers (:mod:`refforge.stages.filters.scorers`).

Every function writes a model to disk in the format its scorer loads in production and returns
what the scorer takes (a model name, a checkpoint file or a folder). Weights are seeded, so two
calls write the same numbers; every model is small enough that scoring a handful of images takes
well under a second on two CPU cores. They measure nothing: they exercise the loading, batching
and arithmetic paths of the scorers (tests, benchmarks).

torch, torchvision, open_clip, transformers and diffusers (the ``models`` extra) are imported
inside the functions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = [
    "TINY_CLIP_NAME",
    "save_tiny_clip",
    "save_tiny_dinov2",
    "save_tiny_dire_classifier",
    "save_tiny_latent_diffusion",
    "save_tiny_pixel_diffusion",
]

TINY_CLIP_NAME = "refforge-tiny-filters-clip"


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def save_tiny_clip(dir: str | Path, seed: int = 1) -> tuple[str, str]:
    """An open_clip model (16-d embeddings, one vision and one text layer): its config is
    registered with ``open_clip.add_model_config`` under :data:`TINY_CLIP_NAME` and its state dict
    saved to ``dir/tiny_clip.pt``. Returns ``(model_name, checkpoint_path)`` for
    ``ClipScorer(model_name, checkpoint_path)``. The registration lasts for the process."""
    import open_clip
    import torch

    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root)
    _seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    path = root / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return TINY_CLIP_NAME, str(path)


def save_tiny_dinov2(dir: str | Path, seed: int = 2) -> str:
    """A transformers ``Dinov2Model`` (hidden 32, 2 layers, 2 heads, patch 14, image 56) and a
    ``BitImageProcessor`` config (shortest edge 64, centre crop 56, ImageNet mean/std: DINOv2's own
    preprocessing, scaled down) so that ``AutoImageProcessor.from_pretrained`` works. Returns the folder."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    root = Path(dir)
    _seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=56)
    Dinov2Model(config).eval().save_pretrained(root)
    BitImageProcessor(do_resize=True, size={"shortest_edge": 64}, do_center_crop=True,
                      crop_size={"height": 56, "width": 56}, do_normalize=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      do_convert_rgb=True).save_pretrained(root)
    return str(root)


def save_tiny_pixel_diffusion(dir: str | Path, seed: int = 3, learned_sigma: bool = False) -> str:
    """An unconditional pixel-space ``UNet2DModel`` (sample size 32, channels 32/64, one attention
    block) with a ``DDIMScheduler``, saved as a ``DDIMPipeline`` folder (``model_index.json``,
    ``unet/``, ``scheduler/``): the layout of a diffusers port of an ADM-style model. With
    ``learned_sigma`` the UNet outputs 6 channels (noise and variance, like ADM). Returns the folder."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    root = Path(dir)
    _seed(seed)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=6 if learned_sigma else 3, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root)
    return str(root)


def _tiny_clip_tokenizer(root: Path, max_length: int):
    """A CLIP BPE tokenizer over a few dozen tokens (every printable ASCII character, with and
    without the end-of-word mark, and the two specials); enough for prompts of plain letters."""
    from transformers import CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=max_length,
                         pad_token="<|endoftext|>")


def save_tiny_latent_diffusion(dir: str | Path, seed: int = 4) -> str:
    """A Stable-Diffusion-style folder (``StableDiffusionPipeline.save_pretrained``):
    ``UNet2DConditionModel`` (4 latent channels, cross-attention 32), ``AutoencoderKL`` (2 blocks:
    one downsampling, so latents are half the image side), ``CLIPTextModel`` (hidden 32, 1 layer),
    a tiny ``CLIPTokenizer`` and a ``DDIMScheduler``; no safety checker. Returns the folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(dir)
    max_length = 16
    tokenizer = _tiny_clip_tokenizer(root / "_tokenizer_src", max_length)
    _seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=max_length, bos_token_id=0,
                                                eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
                        norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root)
    shutil.rmtree(root / "_tokenizer_src")
    return str(root)


def save_tiny_dire_classifier(path: str | Path, seed: int = 5) -> str:
    """A torchvision ResNet-50 with a 1-logit ``fc``, seeded random weights, saved in the DIRE
    repository's checkpoint format: ``{"model": state_dict, "optimizer": ..., "total_steps": int}``
    (ZhendongWang6/DIRE ``utils/trainer.py`` ``BaseModel.save_networks``; ``demo.py`` loads
    ``state_dict["model"]`` into ``networks/resnet.py`` ``resnet50(num_classes=1)``, whose parameter
    names are torchvision's). Returns the file path."""
    import torch
    import torchvision

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _seed(seed)
    model = torchvision.models.resnet50(weights=None, num_classes=1)
    with torch.no_grad():  # a fc bias and scale that keep sigmoid(logit) away from 0 and 1 on random inputs
        model.fc.weight.mul_(0.1)
        model.fc.bias.fill_(0.3)
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=1e-4)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "total_steps": 0}, path)
    return str(path)
