"""Benchmark curation.phash against imagehash.phash on the same image files, in one run.

    python benchmarks/bench_phash.py [--n 2000] [--workers 2] [--images DIR] [--seed 0] [--json OUT]

It writes N varied images (photo-like gradients and smooth fields, noise, flat colours, line art, mirror-
symmetric images; RGB, L, RGBA and P; JPEG, PNG and WebP; 200-1200 px a side) into a temporary folder, adds
the files under --images DIR if given, and times on the same files:
  imagehash        str(imagehash.phash(Image.open(path))) per file, one process (the reference),
  ours_serial      curation.phash.phash_files(workers=1),
  ours_thread      phash_files(workers=W, executor="thread") (the default executor),
  ours_process     phash_files(workers=W, executor="process"),
  draft_approx     NOT in curation: the JPEG draft shortcut (decode at 1/2-1/8 scale, grey only) that the
                   module rejects, timed to show what bit-identity costs.
It reports images/s, the ratio to imagehash (wall, and CPU seconds for the serial runs, which is the fair
per-core figure on a shared machine) and the share of hashes identical to imagehash's, per format too.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from curation.phash import PhashConfig, find_images, hash_thumbnails, phash_files, to_hex  # noqa: E402

KINDS = ("gradient", "smooth", "noise", "flat", "lineart", "mirror")


def random_image(rng: np.random.Generator, kind: str) -> Image.Image:
    """One RGB image of the given content kind, 200-1200 px a side."""
    w, h = (int(v) for v in rng.integers(200, 1201, 2))
    if kind == "gradient":
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        ramp = np.linspace(0.0, 1.0, h)[:, None, None]
        px = np.clip((top * (1 - ramp) + bottom * ramp).repeat(w, axis=1) + rng.normal(0, 8, (h, w, 3)), 0, 255)
        img = Image.fromarray(px.astype(np.uint8))
    elif kind == "smooth":
        small = rng.integers(0, 256, (int(rng.integers(2, 16)), int(rng.integers(2, 16)), 3)).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    elif kind == "noise":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8))
    elif kind == "flat":
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    elif kind == "lineart":
        img = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 30))):
            xy = [int(v) for v in rng.integers(0, max(w, h), 4)]
            draw.line(xy, fill=tuple(int(c) for c in rng.integers(0, 200, 3)), width=int(rng.integers(1, 8)))
    else:  # mirror: left half mirrored into the right, so half the DCT coefficients are exactly zero
        half = rng.integers(0, 256, (int(rng.integers(2, 10)), int(rng.integers(2, 10)), 3)).astype(np.uint8)
        left = np.asarray(Image.fromarray(half).resize((w // 2, h), Image.Resampling.BICUBIC))
        img = Image.fromarray(np.concatenate([left, left[:, ::-1]], axis=1))
    if kind in ("gradient", "flat", "smooth"):
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(0, 5))):
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(5, max(w, h) // 3))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def encode(rng: np.random.Generator, img: Image.Image) -> tuple[bytes, str]:
    """The image in a random mode and format: (bytes, file suffix)."""
    mode = str(rng.choice(["RGB"] * 6 + ["L", "RGBA", "P"]))
    img = img.convert("RGBA") if mode == "RGBA" else img.quantize(64) if mode == "P" else img.convert(mode)
    fmt = str(rng.choice(["JPEG"] * 7 + ["PNG"] * 2 + ["WEBP"])) if mode in ("RGB", "L") else "PNG"
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=int(rng.integers(60, 96)))
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=80)
    else:
        img.save(buf, "PNG", compress_level=int(rng.integers(1, 7)))
    return buf.getvalue(), {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[fmt]


def write_images(root: Path, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        data, suffix = encode(rng, random_image(rng, KINDS[i % len(KINDS)]))
        path = root / f"{i:05d}{suffix}"
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def draft_approx(paths: list[str]) -> np.ndarray:
    """The rejected shortcut: JPEGs decoded in grey at reduced scale (DCT scaling), then the same pipeline."""
    thumbs = np.zeros((len(paths), 32, 32), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            full = img.size
            if img.format == "JPEG":
                img.draft("L", (64, 64))
            box = None
            if img.size != full:  # the scaled decode covers whole 8x8 blocks: crop back to the picture's extent
                scale = next(s for s in (8, 4, 2, 1) if -(-full[0] // s) == img.size[0])
                box = (0.0, 0.0, full[0] / scale, full[1] / scale)
            thumbs[i] = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS, box=box))
    return hash_thumbnails(thumbs)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="generated images")
    parser.add_argument("--images", default=None, help="also hash the image files under this folder")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here as JSON too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = write_images(Path(tmp), args.n, args.seed) + (find_images([args.images]) if args.images else [])
        print(f"{len(paths)} images ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        suffixes = [Path(p).suffix.lower() for p in paths]

        def reference() -> list[str]:
            out = []
            for p in paths:
                with Image.open(p) as img:
                    out.append(str(imagehash.phash(img)))
            return out

        ref, ref_wall, ref_cpu = timed(reference)
        runs: dict[str, tuple[np.ndarray, float, float | None]] = {}
        (hashes, errors), wall, cpu = timed(lambda: phash_files(paths, workers=1))
        runs["ours_serial"] = (hashes, wall, cpu)
        for cfg in (PhashConfig(executor="thread"), PhashConfig(executor="process")):
            (hashes, _), wall, _ = timed(partial(phash_files, paths, workers=args.workers, config=cfg))
            runs[f"ours_{cfg.executor}"] = (hashes, wall, None)
        hashes, wall, cpu = timed(lambda: draft_approx(paths))
        runs["draft_approx"] = (hashes, wall, cpu)

    ref_int = np.array([int(r, 16) for r in ref], dtype=np.uint64)
    n = len(paths)
    rows: dict[str, dict[str, Any]] = {
        "imagehash": {"images_per_s": n / ref_wall, "ratio_wall": 1.0, "ratio_cpu": 1.0, "identical": 1.0}
    }
    for name, (hashes, wall, cpu_s) in runs.items():
        same = hashes == ref_int
        rows[name] = {
            "images_per_s": n / wall,
            "ratio_wall": ref_wall / wall,
            "ratio_cpu": ref_cpu / cpu_s if cpu_s else None,
            "identical": float(same.mean()),
            "mean_bits_off": float(np.bitwise_count(hashes ^ ref_int).mean()),
            "identical_by_format": {
                s: round(float(same[[x == s for x in suffixes]].mean()), 4) for s in sorted(set(suffixes))
            },
        }
    hex_same = [to_hex(h) == r for h, r in zip(runs["ours_serial"][0], ref, strict=True)]

    print(f"{n} images ({dict(Counter(suffixes))}), workers={args.workers}, cores={os.cpu_count()}")
    print(f"ours_serial hex equal to str(imagehash.phash): {np.mean(hex_same):.2%}; errors: {sum(map(bool, errors))}")
    print(f"{'run':<16}{'images/s':>10}{'x wall':>8}{'x cpu':>7}{'identical':>11}{'bits off':>10}")
    for name, row in rows.items():
        ratio_cpu = f"{row['ratio_cpu']:.2f}" if row["ratio_cpu"] else "-"
        print(
            f"{name:<16}{row['images_per_s']:>10.1f}{row['ratio_wall']:>8.2f}{ratio_cpu:>7}"
            f"{row['identical']:>10.2%}{row.get('mean_bits_off', 0.0):>10.3f}"
        )
    result = {
        "bench": "phash",
        "images": n,
        "workers": args.workers,
        "cores": os.cpu_count(),
        "hex_identical": float(np.mean(hex_same)),
        "errors": sum(map(bool, errors)),
        "runs": rows,
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
