"""Synthetic ingest benchmark: rendering and PNG encoding, the previous release against the current code.

Renders and encodes ``--scenes`` scenes of a config's ``[source]`` (configs/demo.toml by default: the
seeds the ingest stage would use) with both implementations in one process and reports, per image, the
CPU milliseconds of ``render`` and of ``encode_png``, the PNG size, and the ratio previous / current.
The previous release's functions are kept below as the baseline (``_old_*``: the ones issue 18 rewrote;
the helpers it left alone are imported). Every image's PNGs are decoded and compared pixel for pixel.

Two passes, each starting with cold caches on both sides and alternating which implementation runs
first on each scene, so that a busy machine slows both alike:

1. the previous release against ``encode_png(render(...))`` (what ``ingest_synthetic`` calls);
2. the previous release against ``encode_png(render_array(...))``, which skips the PIL image between
   the two.

Times are thread CPU time (``time.thread_time``); wall time is printed as well.

    .venv/bin/python benchmarks/bench_ingest.py [--scenes 200] [--config configs/demo.toml]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import machine  # noqa: E402  (the machine line every benchmark prints)

from refforge.config import load_config  # noqa: E402
from refforge.stages.ingest import synthetic as S
from refforge.stages.ingest.scenes import synthetic_seed
from refforge.stages.ingest.synthetic import (
    BODY,
    COLOURS,
    SECOND,
    SECONDARY,
    _attr,
    _int_box,
    _upsample,
    draw_order,
)

# ---------------------------------------------------------------------------------------------------
# The previous release's rendering and encoding (the baseline), with caches of their own
# ---------------------------------------------------------------------------------------------------

# unchanged helpers, shared by both sides: ``generate_scene`` fills ``_shape``'s cache for the scene it
# lays out (as it does in ingest), so both renderers find their objects' masks there
_old_shape = S._shape
_old_pattern_mask = S._pattern_mask


@lru_cache(maxsize=256)
def _old_patch_cached(name, w, h, colour, pattern, mirrored):
    labels, detail = _old_shape(name, w, h)
    mask = labels > 0
    body = np.array(COLOURS.get(colour, COLOURS["gray"]), dtype=np.float32)
    second = np.array(SECONDARY.get(name, (90, 90, 90)), dtype=np.float32)
    lum = 0.299 * body[0] + 0.587 * body[1] + 0.114 * body[2]
    ink = body * 0.42 if lum > 150 else body * 0.45 + 255.0 * 0.55
    table = np.stack([body, ink, second, body * 0.55, ink * 0.55, second * 0.55])
    cls = np.where(labels == SECOND, 2, 0).astype(np.uint8)
    pat = _old_pattern_mask(pattern, w, h)
    if pat is not None:
        cls[pat & (labels == BODY)] = 1
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    cls[detail | (mask & ~inner)] += 3
    shade = np.linspace(1.06, 0.9, h, dtype=np.float32)[:, None, None]
    rgb = table[cls] * shade
    np.clip(rgb, 0, 255, out=rgb)
    rgb8 = rgb.astype(np.uint8)
    if mirrored:
        rgb8, mask = np.ascontiguousarray(rgb8[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
    rgb8.flags.writeable = False
    mask.flags.writeable = False
    return rgb8, mask


@lru_cache(maxsize=8)
def _old_background_cached(bg_json, width, height, mirrored):
    bg = json.loads(bg_json)
    rng = np.random.default_rng(int(bg["seed"]))
    hz = min(max(int(round(float(bg["horizon"]) * height)), 1), height - 1)
    rows = np.arange(height, dtype=np.float32)
    row_lum = np.where(
        rows < hz, 1.07 - 0.12 * rows / hz, 0.84 + 0.22 * (rows - hz) / max(height - hz, 1)
    ).astype(np.float32)
    noise = float(bg["noise"])
    gh, gw = max(2, height // 16), max(2, width // 16)
    coarse = _upsample(rng.standard_normal((5, 7)), gh, gw)
    fine = rng.standard_normal((gh, gw)).astype(np.float32)
    fine = 0.25 * (fine + np.roll(fine, 1, 0) + np.roll(fine, 1, 1) + np.roll(np.roll(fine, 1, 0), 1, 1))
    lum = _upsample(coarse * noise + fine * (noise * 0.6), height, width).copy()
    lum += row_lum[:, None]
    if bg.get("wall_style") == "stripes":
        period = max(8, width // int(rng.integers(10, 20)))
        lum[:hz, (np.arange(width) // period) % 2 == 1] += 0.035
    style = bg.get("floor_style", "planks")
    if style == "planks":
        edges = np.round(hz + (height - hz) * (np.linspace(0.0, 1.0, 9) ** 1.4)).astype(int)
        tone = rng.normal(0.0, 0.035, 8)
        offsets = rng.integers(0, width, 8)
        seam_len = max(40, width // 3)
        for b in range(8):
            r0, r1 = int(edges[b]), int(edges[b + 1])
            if r1 <= r0:
                continue
            lum[r0:r1] += float(tone[b])
            lum[r0, :] -= 0.18
            first = int((seam_len - offsets[b] % seam_len) % seam_len)
            lum[r0:r1, first::seam_len] -= 0.15
    elif style == "tiles":
        tile = max(12, width // int(rng.integers(8, 14)))
        lum[hz:, ::tile] -= 0.1
        lum[hz :: max(tile // 2, 4), :] -= 0.1
    skirt = max(2, height // 90)
    lum[max(hz - skirt, 0) : hz + 1] *= 0.7
    gh2, gw2 = (height + 1) // 2, (width + 1) // 2
    grain = rng.standard_normal((gh2, gw2), dtype=np.float32) * (float(bg["grain"]) / 160.0)
    lum += np.repeat(np.repeat(grain, 2, axis=0), 2, axis=1)[:height, :width]
    base = np.where(
        (rows < hz)[:, None], np.array(bg["wall"], dtype=np.float32), np.array(bg["floor"], dtype=np.float32)
    )
    rgb = lum[:, :, None] * base[:, None, :]
    np.clip(rgb, 0, 255, out=rgb)
    out = rgb.astype(np.uint8)
    if mirrored:
        out = np.ascontiguousarray(out[:, ::-1])
    out.flags.writeable = False
    return out


def _old_render(graph, spec) -> Image.Image:
    width, height = int(graph.width), int(graph.height)
    bg_json = json.dumps(spec["background"], sort_keys=True)
    canvas = np.array(_old_background_cached(bg_json, width, height, bool(spec.get("mirrored", False))))
    for obj in draw_order(graph):
        x1, y1, x2, y2 = _int_box(obj.box)
        rgb, mask = _old_patch_cached(obj.name, x2 - x1, y2 - y1, _attr(obj, "colour", "gray"),
                                      _attr(obj, "pattern", "plain"), bool(spec.get("mirrored", False)))
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if cx1 >= cx2 or cy1 >= cy2:
            continue
        sub_m = mask[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
        sub_c = rgb[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
        region = canvas[cy1:cy2, cx1:cx2]
        region[sub_m] = sub_c[sub_m]
    return Image.fromarray(canvas, mode="RGB")


def _old_encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1, optimize=False)
    return buf.getvalue()


def _clear_caches() -> None:
    for f in (_old_patch_cached, _old_background_cached, S._shape, S._pattern_mask, S._patch_cached,
              S._background_cached, S._colour_table):
        f.cache_clear()


# ---------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------


def _timed(fn: Callable, *args):
    c, w = time.thread_time(), time.perf_counter()
    out = fn(*args)
    return out, time.thread_time() - c, time.perf_counter() - w


def _decoded(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


def run_pass(make_scene: Callable, n: int, new_render: Callable) -> dict:
    """Both implementations over ``n`` scenes from cold caches, each scene laid out just before it is
    rendered (as ingest does); per-image CPU and wall seconds and PNG sizes."""
    _clear_caches()
    sides = {"old": (_old_render, _old_encode_png), "new": (new_render, S.encode_png)}
    res = {k: {"render": [], "encode": [], "wall": [], "bytes": [], "png": []} for k in sides}
    res["generate"] = []
    for i in range(n):
        sc, gc, _ = _timed(make_scene, i)
        res["generate"].append(gc)
        for side in (("old", "new") if i % 2 == 0 else ("new", "old")):
            render, encode = sides[side]
            img, rc, rw = _timed(render, sc.graph, sc.spec)
            png, ec, ew = _timed(encode, img)
            r = res[side]
            r["render"].append(rc)
            r["encode"].append(ec)
            r["wall"].append(rw + ew)
            r["bytes"].append(len(png))
            r["png"].append(png)
    res["equal"] = sum(np.array_equal(_decoded(a), _decoded(b))
                       for a, b in zip(res["old"]["png"], res["new"]["png"], strict=True))
    return res


def _machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{machine()}; numpy {np.__version__}, Pillow {PIL.__version__}, zlib {zlib.ZLIB_RUNTIME_VERSION}; "
            f"load average {load}")


def _report(name: str, res: dict, n: int) -> None:
    ms = lambda xs: 1000 * statistics.fmean(xs)  # noqa: E731
    med = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    o, w = res["old"], res["new"]
    tot = lambda r: [a + b for a, b in zip(r["render"], r["encode"], strict=True)]  # noqa: E731
    print(f"\n{name}: {n} images, decoded pixels equal for {res['equal']} of {n}")
    print(f"  {'':22s} {'previous':>10s} {'current':>10s} {'ratio':>7s}")
    for label, a, b in (("render ms (mean)", ms(o["render"]), ms(w["render"])),
                        ("encode ms (mean)", ms(o["encode"]), ms(w["encode"])),
                        ("render+encode ms (mean)", ms(tot(o)), ms(tot(w))),
                        ("render+encode ms (median)", med(tot(o)), med(tot(w))),
                        ("wall ms (mean)", ms(o["wall"]), ms(w["wall"]))):
        print(f"  {label:26s} {a:10.2f} {b:10.2f} {a / b:7.2f}")
    bo, bn = statistics.fmean(o["bytes"]), statistics.fmean(w["bytes"])
    print(f"  {'bytes per image (mean)':26s} {bo:10.0f} {bn:10.0f} {bo / bn:7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.toml"))
    args = ap.parse_args()
    cfg = load_config(args.config)
    src = cfg.source
    if src.kind != "synthetic":
        sys.exit(f"{args.config}: [source] kind is {src.kind!r}, not 'synthetic'")

    def make_scene(i: int) -> S.SyntheticScene:
        return S.generate_scene(synthetic_seed(cfg.build.seed, i), width=src.width, height=src.height,
                                min_objects=src.min_objects, max_objects=src.max_objects)

    print(_machine())
    print(f"config {args.config}: {src.width} x {src.height}, {src.min_objects}-{src.max_objects} objects, "
          f"build seed {cfg.build.seed}; times are thread CPU time per image")
    n = args.scenes
    one = run_pass(make_scene, n, S.render)
    _report("1. encode_png(render(...)), as ingest_synthetic calls it", one, n)
    two = run_pass(make_scene, n, S.render_array)
    _report("2. encode_png(render_array(...)), no PIL image in between", two, n)
    same = all(a == b for a, b in zip(one["new"]["png"], two["new"]["png"], strict=True))
    print(f"\ncurrent PNG bytes equal between the two paths: {same}")
    print(f"generate_scene (not part of either side), ms per scene: {1000 * statistics.fmean(one['generate']):.2f}")
    if one["equal"] != n or two["equal"] != n or not same:
        sys.exit("decoded pixels differ")


if __name__ == "__main__":
    main()
