"""Tiny, randomly initialised diffusers inpainting pipelines saved to a folder (tests, benchmarks).

``save_tiny_sd_inpaint(path)`` writes a ``StableDiffusionInpaintPipeline`` whose parts are real
diffusers / transformers classes at toy sizes: a UNet2DConditionModel with 9 input channels (4 noisy
latents + 1 mask + 4 masked-image latents), a two-level AutoencoderKL (4 latent channels, so the VAE
scale factor is 2: a 64x64 image has 32x32 latents), a 2-layer CLIPTextModel of width 32, a real CLIP
BPE tokenizer and a DDIM scheduler; no safety checker. The weights are random (seeded: the same call
writes the same weights), so the images are noise, but every code path of the pipeline runs: prompt
encoding, classifier-free guidance, mask and masked-image latents, the denoising loop, VAE decoding.
A 64x64 call with 2 steps takes a few hundredths of a second on one CPU core.

The tokenizer is built from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` (the merges of
OpenAI's CLIP) the way CLIP builds its vocabulary: the 256 byte symbols, the same with ``</w>``, one
token per merge (the first 49152 - 256 - 2 merges), then the two special tokens, written as
``<|startoftext|>`` / ``<|endoftext|>`` (the names transformers' CLIPTokenizer uses; open_clip calls
them ``<start_of_text>`` / ``<end_of_text>``). That gives the 49408-token vocabulary of every Stable
Diffusion 1.x/2.x text encoder.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from refforge.optional import require

VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of the bytes (GPT-2 / CLIP byte-level BPE), in vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first, in byte order; the other bytes follow,
    in byte order, mapped to the code points 256, 257, ... (so "!" has id 0 and "a</w>" id 320).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    rest = [b for b in range(256) if b not in kept]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def write_clip_tokenizer_files(folder: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` of CLIP's tokenizer (from open_clip's BPE file) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with bpe.open("rb") as fh:
        lines = gzip.decompress(fh.read()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a version header
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise RuntimeError(f"built a CLIP vocabulary of {len(tokens)} tokens ({len(set(tokens))} distinct)")
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8"
    )
    merges_path.write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return vocab_path, merges_path


def tiny_clip_tokenizer(folder: str | Path):
    """A transformers ``CLIPTokenizer`` over CLIP's real vocabulary (files written to ``folder``)."""
    transformers = require("transformers", "models", feature="tiny inpainting pipelines")
    vocab_path, merges_path = write_clip_tokenizer_files(folder)
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    lines = merges_path.read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    # transformers 5's CLIPTokenizer is the `tokenizers`-backed class: it takes the vocabulary dict and
    # the merge pairs themselves (vocab_file= / merges_file= are silently ignored and leave a 3-token vocab)
    return transformers.CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def build_tiny_sd_inpaint(workdir: str | Path, seed: int = 0):
    """The tiny ``StableDiffusionInpaintPipeline`` (not saved); ``workdir`` receives the tokenizer files."""
    torch = require("torch", "models", feature="tiny inpainting pipelines")
    diffusers = require("diffusers", "models", feature="tiny inpainting pipelines")
    transformers = require("transformers", "models", feature="tiny inpainting pipelines")

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=32,
        in_channels=9,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )
    torch.manual_seed(seed + 2)
    text_config = transformers.CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=VOCAB_SIZE - 1,
    )
    text_encoder = transformers.CLIPTextModel(text_config)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    tokenizer = tiny_clip_tokenizer(Path(workdir) / "_bpe")
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def save_tiny_sd_inpaint(path: str | Path, seed: int = 0) -> str:
    """Build the tiny Stable Diffusion inpainting pipeline and ``save_pretrained`` it to ``path``.

    Loadable with ``diffusers.AutoPipelineForInpainting.from_pretrained(path)`` (model_index.json names
    ``StableDiffusionInpaintPipeline``). Returns ``str(path)``.
    """
    import shutil
    import tempfile

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_tiny_sd_inpaint(tmp, seed=seed)
        pipe.save_pretrained(str(path))
    shutil.rmtree(path / "_bpe", ignore_errors=True)
    return str(path)
