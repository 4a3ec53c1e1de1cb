"""The faster synthetic renderer and PNG encoder (issue 18) paint the previous release's pixels exactly.

``PREVIOUS`` holds, for scenes of several sizes, mirrored and edited, the sha256 of the RGB pixels that
the previous release's ``render`` painted (computed with that release's code; see ``cases``). The PNG
bytes changed (unfiltered rows, zlib level 1), so the tests decode them and compare pixels.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from refforge.stages.ingest import synthetic as S

# (case name) -> sha256 of the previous release's render(...) as a C-contiguous (H, W, 3) uint8 array
PREVIOUS = {
    "seed0_512x384": "e7cfd153e1269c430678c519ef687b4d5cc40d9749b8999be7c52f74b1a59d02",
    "seed1_512x384": "6a612282031dd801065c6657e2f05f0ade89a254646a2438ec30bb6f0760ec53",
    "seed2_512x384": "400b058c8df93f313875506f6d29c1230364f7803b8d90aa902ede199eddeebd",
    "seed3_512x384": "f57bc0d90de1df0919267832a665ebb444e7bc742fb9de75c350b7857e2ae635",
    "seed4_512x384": "ef697351a0ed08349d9dbfd493f1aec8a2adad99de81336d4fe69caa84995dc1",
    "seed5_512x384": "2d43fd5f1d635bad1053aeb0c1704508f3d1d73bc281667b8b68af900c810365",
    "seed6_512x384": "b50a7bd3c73d4d6b266ad96f610c9fd7915a48918d5a9442f1f2cda53f5dfa21",
    "seed7_512x384": "ed21d545b402002ddb8a9ad83b2c01ae5de2fc60508774ef284eaf70f7e738ae",
    "seed100_257x131": "d2fb2e1772dfdc9172d43555cf10fcde752c5c4aab148026eea4c6c9aaf78488",
    "seed101_128x97": "b617d21745e75b5bf4fb276e38dfff4875b30e2ed61151007e032f4d9d4186ef",
    "seed102_97x128": "58eb657092c3863cdb77d14a635e992cbcdc29600117b50ac8c7aebdaa5a6ee4",
    "seed103_64x64": "1a99c8c1c81c594f43e07d519b467e413faad638270f2bc35560f0a4f92163a0",
    "seed0_mirrored": "eb53fd239e4b81f4f9e444b5643e65a031dfa348ef5e2a1c2dbc655d962875a5",
    "seed1_mirrored": "03c915f653d24188805dec4f00973be5c185d4864af060c061106427ad8f73fb",
    "seed102_mirrored": "0877dcd3fd92c6c8b4dc0897bef9e56ac70506721454c90f3c41da5f08a72202",
    "seed5_size": "0e772850afe529f35776b583accfd9efc57a6f5316ad4d03d32ac67b29e7675c",
    "seed5_colour": "091594c25588e1e8b8cc8b58a0c1dd747f5624f696cdf44a678323705d70b1e2",
    "seed5_pattern": "eaf84e5a50fbd5b569593a8f904ba16beee831c8ef14a888147930f7abc9d67d",
    "seed5_removed": "5f05ba474a44ca53e6208d8fe7fb053a0826546ef1f5022488d1bd8f6c6da28b",
    "seed5_category": "b1cde67de270e140665901bec59e0561fbfe64114b8ba05689929000c6ede60e",
}


def cases(mod=S) -> dict[str, tuple]:
    """Scenes (graph, spec) covering even and odd sizes, the mirrored background and every edit."""
    out: dict[str, tuple] = {}
    for seed in range(8):
        sc = mod.generate_scene(seed)
        out[f"seed{seed}_512x384"] = (sc.graph, sc.spec)
    for seed, (w, h) in ((100, (257, 131)), (101, (128, 97)), (102, (97, 128)), (103, (64, 64))):
        sc = mod.generate_scene(seed, width=w, height=h, min_objects=1, max_objects=6)
        out[f"seed{seed}_{w}x{h}"] = (sc.graph, sc.spec)
    for seed in (0, 1, 102):
        g, s = out[next(k for k in out if k.startswith(f"seed{seed}_"))]
        out[f"seed{seed}_mirrored"] = mod.mirror(g, s)
    g, s = out["seed5_512x384"]
    target = g.objects[0].id
    attrs = g.objects[0].attributes
    size = next(v for v in ("small", "large") if v not in attrs)
    out["seed5_size"] = mod.set_attribute(g, s, target, "size", size)
    out["seed5_colour"] = mod.set_attribute(g, s, target, "colour", next(v for v in ("orange", "blue") if v not in attrs))
    out["seed5_pattern"] = mod.set_attribute(g, s, target, "pattern", next(v for v in ("dotted", "striped")
                                                                            if v not in attrs))
    out["seed5_removed"] = mod.remove_object(g, s, target)
    out["seed5_category"] = mod.set_category(g, s, target, "star")
    return out


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        return np.asarray(im)


def chunks(png: bytes) -> list[tuple[bytes, int]]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        out.append((kind, length))
        pos += 12 + length
    assert pos == len(png)
    return out


@pytest.fixture(scope="module")
def scenes() -> dict[str, tuple]:
    return cases()


def test_the_cases_are_the_pinned_ones(scenes):
    assert set(scenes) == set(PREVIOUS)


@pytest.mark.parametrize("name", sorted(PREVIOUS))
def test_render_paints_the_previous_release_s_pixels(scenes, name):
    graph, spec = scenes[name]
    arr = S.render_array(graph, spec)
    assert arr.shape == (graph.height, graph.width, 3) and arr.dtype == np.uint8
    assert digest(arr) == PREVIOUS[name]
    img = S.render(graph, spec)
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), arr)
    png = S.encode_png(img)
    assert png == S.encode_png(arr)  # the PIL image and the array encode alike
    assert np.array_equal(decode(png), arr)
    # a second, stricter decoder (libpng through OpenCV) reads the same pixels
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(bgr[:, :, ::-1], arr)


def test_cached_and_fresh_renders_agree(scenes):
    """A render from warm caches (objects, backgrounds, colour tables) equals one from cold caches."""
    graph, spec = scenes["seed3_512x384"]
    warm = S.render_array(graph, spec)
    for f in (S._shape, S._background_cached, S._patch_cached, S._pattern_mask, S._colour_table):
        f.cache_clear()
    assert np.array_equal(S.render_array(graph, spec), warm)
    assert digest(warm) == PREVIOUS["seed3_512x384"]


def test_render_array_is_a_fresh_writable_array(scenes):
    graph, spec = scenes["seed1_512x384"]
    a = S.render_array(graph, spec)
    a[:] = 0  # must not reach the cached background
    assert digest(S.render_array(graph, spec)) == PREVIOUS["seed1_512x384"]


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 5, 3), (97, 131, 3), (384, 512, 3), (7, 9), (7, 9, 1),
                                   (40, 33, 4), (600, 700, 3)])
def test_encode_png_roundtrips_any_8bit_image(shape):
    rng = np.random.default_rng(sum(shape))
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    arr[: shape[0] // 2] //= 16  # some runs, so that deflate finds matches too
    png = S.encode_png(arr)
    kinds = chunks(png)
    assert [k for k, _ in kinds][0] == b"IHDR" and kinds[-1] == (b"IEND", 0)
    assert {k for k, _ in kinds} == {b"IHDR", b"IDAT", b"IEND"}  # no metadata
    assert all(n <= 65536 for k, n in kinds if k == b"IDAT")
    expect = arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == {2: "L", 3: "RGB", 4: "RGBA"}[expect.ndim if expect.ndim == 2 else expect.shape[2]]
        assert im.size == (shape[1], shape[0])
    assert np.array_equal(decode(png), expect)
    assert S.encode_png(arr) == png  # deterministic


def test_a_large_image_is_split_into_idat_chunks():
    arr = np.random.default_rng(0).integers(0, 256, (600, 700, 3), dtype=np.uint8)
    idat = [n for k, n in chunks(S.encode_png(arr)) if k == b"IDAT"]
    assert len(idat) > 1 and all(n == 65536 for n in idat[:-1]) and 0 < idat[-1] <= 65536


def test_encode_png_takes_pil_images_of_every_mode():
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for img in (rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"), rgb.convert("1")):
        back = Image.open(io.BytesIO(S.encode_png(img)))
        assert back.mode == img.mode and back.size == img.size
        assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(img.convert("RGB")))


def test_encode_png_refuses_what_it_cannot_write():
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((4,), np.uint8),
                np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ValueError):
            S.encode_png(bad)
