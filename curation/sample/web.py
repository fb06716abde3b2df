"""The embedded sample web: a deterministic miniature Common Crawl crawl with ground truth.

`generate_sample_web(out, SampleWebConfig(...))` writes

- ``web/<host>/<path>``: the image bytes the sample server serves (see `curation.sample.server`);
- ``crawl-data/<CRAWL>/{wat,segment}.paths.gz`` and per-segment ``*.warc.wat.gz`` files in Common
  Crawl's layout, one gzip member per WARC record, with CC's JSON envelope;
- ``truth.parquet``: one row per image link URL with what every stage should conclude about it
  (columns in `TRUTH_COLUMNS`);
- ``manifest.json``: crawl id, hosts, port, counts.

Images are drawn with PIL from a small visual vocabulary (shapes x colours x backgrounds x counts)
so a small CLIP has something real to learn, plus planted cases: mismatched captions, near and exact
duplicates, watermarks, an "unsafe" stand-in concept, an aesthetic score derived from image
properties, high-resolution originals, hostile HTTP behaviours and excluded links (data:, svg, gif,
short alts). Everything is a pure function of the seed.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import math
import struct
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from multiprocessing import get_context
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

import ftfy
import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from curation.io import write_json, write_parquet
from curation.sample.consent import CONSENT_BEHAVIOURS, CONSENT_ROLES, plant_consent, write_robots

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
SHAPE_PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "hexagon": "hexagons",
    "cross": "crosses",
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 20),
    "purple": (135, 50, 175),
    "orange": (245, 125, 20),
}
BACKGROUNDS = ("plain", "gradient", "stripes", "dots", "noise")
BACKGROUND_WORDS = {
    "plain": "plain",
    "gradient": "soft gradient",
    "stripes": "striped",
    "dots": "dotted",
    "noise": "noisy",
}
# Aesthetic truth: a fixed function of visible properties (background style, grain, watermark).
BACKGROUND_AESTHETIC = {"gradient": 2.5, "plain": 1.5, "dots": 1.0, "stripes": 0.5, "noise": 0.0, "hazard": 0.5}
COUNT_WORDS = ("one", "two", "three", "four")
UNSAFE_CONCEPT = "hazard"
UNSAFE_CAPTIONS = (
    "hazard warning sign with black and yellow stripes",
    "danger hazard stripes warning triangle",
    "yellow and black hazard tape with a warning sign",
    "caution: hazard zone warning symbol",
)
WATERMARK_TEXT = "© PIXSTOCK"

# Translations for the non-English alts (language truth for the extraction's language ID).
TRANSLATIONS: dict[str, dict[str, Any]] = {
    "de": {
        "template": "Eine Zeichnung mit {count} {shape} in der Farbe {colour} auf einem hellen Hintergrund",
        "counts": ("einem", "zwei", "drei", "vier"),
        "shapes": {
            "circle": ("Kreis", "Kreisen"),
            "square": ("Quadrat", "Quadraten"),
            "triangle": ("Dreieck", "Dreiecken"),
            "star": ("Stern", "Sternen"),
            "hexagon": ("Sechseck", "Sechsecken"),
            "cross": ("Kreuz", "Kreuzen"),
        },
        "colours": {
            "red": "Rot",
            "green": "Grün",
            "blue": "Blau",
            "yellow": "Gelb",
            "purple": "Lila",
            "orange": "Orange",
        },
    },
    "fr": {
        "template": "Un dessin avec {count} {shape} de couleur {colour} sur un fond très clair",
        "counts": ("un", "deux", "trois", "quatre"),
        "shapes": {
            "circle": ("cercle", "cercles"),
            "square": ("carré", "carrés"),
            "triangle": ("triangle", "triangles"),
            "star": ("étoile", "étoiles"),
            "hexagon": ("hexagone", "hexagones"),
            "cross": ("croix", "croix"),
        },
        "colours": {
            "red": "rouge",
            "green": "verte",
            "blue": "bleue",
            "yellow": "jaune",
            "purple": "violette",
            "orange": "orange",
        },
    },
    "es": {
        "template": "Un dibujo con {count} {shape} de color {colour} sobre un fondo muy claro",
        "counts": ("un", "dos", "tres", "cuatro"),
        "shapes": {
            "circle": ("círculo", "círculos"),
            "square": ("cuadrado", "cuadrados"),
            "triangle": ("triángulo", "triángulos"),
            "star": ("estrella", "estrellas"),
            "hexagon": ("hexágono", "hexágonos"),
            "cross": ("cruz", "cruces"),
        },
        "colours": {
            "red": "rojo",
            "green": "verde",
            "blue": "azul",
            "yellow": "amarillo",
            "purple": "morado",
            "orange": "naranja",
        },
    },
}

# HTTP behaviours the sample server implements, with the download outcome truth expects.
HTTP_BEHAVIOURS: dict[str, tuple[str, str | None]] = {
    "ok": ("success", None),
    "not_found": ("failed", "http_404"),
    "server_error": ("failed", "http_500"),
    "redirect": ("success", None),  # a 302 -> 301 chain ending at the image
    "redirect_loop": ("failed", "redirect_loop"),
    "slow": ("success", None),  # answers after SLOW_SECONDS, inside a 10 s timeout
    "x_robots_noai": ("failed", "x_robots_tag"),
    "x_robots_nofollow": ("success", None),  # an X-Robots-Tag that is not an opt-out
    "wrong_content_type": ("success", None),  # a real image labelled text/plain
    "not_an_image": ("failed", "not_an_image"),  # an HTML page labelled image/jpeg
    "truncated": ("failed", "truncated"),  # Content-Length promises more than is sent
    "corrupt": ("failed", "corrupt"),  # JPEG magic followed by garbage
    "tiny": ("failed", "too_small"),  # a real image under LAION's 5,000-byte floor
    "decompression_bomb": ("failed", "too_many_pixels"),
    "oversized": ("failed", "too_many_pixels"),
}
SLOW_SECONDS = 1.5
# Share of downloadable links given each non-ok behaviour (the rest are "ok"); bombs are counted.
BEHAVIOUR_SHARES = {
    "not_found": 0.02,
    "server_error": 0.012,
    "redirect": 0.03,
    "redirect_loop": 0.004,
    "slow": 0.006,
    "x_robots_noai": 0.012,
    "x_robots_nofollow": 0.008,
    "wrong_content_type": 0.008,
    "not_an_image": 0.008,
    "truncated": 0.008,
    "corrupt": 0.008,
    "tiny": 0.008,
}
BOMB_COUNT = 2
MIN_SERVED_BYTES = 6000
MAX_DISTINCT_ROUNDS = 20
OVERSIZED_COUNT = 2

TRUTH_COLUMNS = (
    "url",
    "src",
    "link_form",
    "page_url",
    "segment",
    "wat_file",
    "occurrences",
    "alt_raw",
    "caption",
    "language",
    "extract",
    "exclude_reason",
    "concept",
    "shape",
    "colour",
    "background",
    "count",
    "caption_matches",
    "dup_group",
    "dup_kind",
    "exact_copy_of",
    "watermark",
    "unsafe",
    "aesthetic",
    "grain",
    "width",
    "height",
    "format",
    "http_behavior",
    "expect_status",
    "expect_reason",
    "file",
    "sha256",
    "bytes",
    "phash",
    "split",
)


@dataclass(frozen=True)
class SampleWebConfig:
    """What to generate. Every field is validated; the output is a pure function of these values."""

    seed: int = 0
    pages: int = 300
    segments: int = 3
    wat_files_per_segment: int = 2
    crawl: str = "CC-MAIN-2024-51"
    port: int = 8642
    hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2")
    images_per_page: tuple[int, int] = (6, 12)
    mismatch_rate: float = 0.12
    watermark_rate: float = 0.08
    unsafe_rate: float = 0.06
    high_res_rate: float = 0.03
    dup_group_rate: float = 0.07
    non_english_rate: float = 0.12
    min_phash_distance: int = 10
    workers: int = 2
    # Consent planting (curation.sample.consent): robots.txt hosts and TDMRep images with their truth. Off by
    # default: the default web, which the toy CLIP is trained on, stays exactly as it is.
    consent: bool = False
    consent_hosts: tuple[str, ...] = ("127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7")
    consent_user_agent: str = "curation"  # the product token the planted robots.txt disallows

    def __post_init__(self) -> None:
        if self.pages < 1 or self.segments < 1 or self.wat_files_per_segment < 1:
            raise ValueError("pages, segments and wat_files_per_segment must be >= 1")
        if self.segments > 100:
            raise ValueError("a crawl has at most 100 segments (partition keys 000-099)")
        if not self.crawl.startswith("CC-MAIN-"):
            raise ValueError(f"crawl id must look like CC-MAIN-YYYY-WW, got {self.crawl!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if not self.hosts:
            raise ValueError("at least one host is needed")
        overlap = set(self.consent_hosts) & set(self.hosts)
        if self.consent and (len(self.consent_hosts) != len(CONSENT_ROLES) or overlap):
            raise ValueError(f"consent needs {len(CONSENT_ROLES)} consent_hosts ({', '.join(CONSENT_ROLES)}), "
                             "none of them in hosts")
        lo, hi = self.images_per_page
        if not 1 <= lo <= hi:
            raise ValueError(f"images_per_page must be (lo, hi) with 1 <= lo <= hi, got {self.images_per_page}")
        for name in (
            "mismatch_rate",
            "watermark_rate",
            "unsafe_rate",
            "high_res_rate",
            "dup_group_rate",
            "non_english_rate",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")

    def authority(self, host_index: int = 0) -> str:
        return f"{self.hosts[host_index % len(self.hosts)]}:{self.port}"


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to draw one image; drawing is a pure function of it."""

    image_id: str
    concept: str
    shape: str | None
    colour: str | None
    background: str
    count: int
    grain: float
    watermark: bool
    width: int
    height: int
    fmt: str
    quality: int
    layout_seed: int
    attempt: int = 0
    # Near-duplicate transform applied to the drawn original: (kind, parameter).
    transform: tuple[str, float] | None = None


@dataclass
class Rendered:
    image_id: str
    data: bytes
    width: int
    height: int
    phash: str
    fmt: str


@dataclass
class Link:
    """One image link planted in a page, and what truth says about it."""

    url: str
    src: str
    link_form: str
    alt_raw: str | None
    truth: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Drawing


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, offset: float) -> list[tuple[float, float]]:
        return [
            (cx + radius * math.cos(offset + 2 * math.pi * k / n), cy + radius * math.sin(offset + 2 * math.pi * k / n))
            for k in range(n)
        ]

    if shape == "triangle":
        return ring(3, r, rot - math.pi / 2)
    if shape == "square":
        return ring(4, r, rot + math.pi / 4)
    if shape == "hexagon":
        return ring(6, r, rot)
    if shape == "star":
        outer, inner = ring(5, r, rot - math.pi / 2), ring(5, r * 0.45, rot - math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        a, b = r, r * 0.36
        pts = [
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
        ]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(shape)


def _pastel(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(185, 250, size=3))  # type: ignore[return-value]


def _background(spec: ImageSpec, rng: np.random.Generator) -> Image.Image:
    w, h = spec.width, spec.height
    if spec.concept == UNSAFE_CONCEPT:
        img = Image.new("RGB", (w, h), (245, 200, 0))
        d = ImageDraw.Draw(img)
        band = max(w, h) // int(rng.integers(6, 10))
        for x0 in range(-h, w + h, 2 * band):
            d.polygon([(x0, 0), (x0 + band, 0), (x0 + band + h, h), (x0 + h, h)], fill=(20, 20, 20))
        return img
    a, b = _pastel(rng), _pastel(rng)
    if spec.background == "plain":
        return Image.new("RGB", (w, h), a)
    if spec.background == "gradient":
        t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        arr = (1 - t) * np.array(a, np.float32) + t * np.array(b, np.float32)
        return Image.fromarray(np.broadcast_to(arr, (h, w, 3)).astype(np.uint8))
    if spec.background == "stripes":
        img = Image.new("RGB", (w, h), a)
        d = ImageDraw.Draw(img)
        band = max(6, w // int(rng.integers(8, 16)))
        for x0 in range(0, w, 2 * band):
            d.rectangle([x0, 0, x0 + band - 1, h], fill=b)
        return img
    if spec.background == "dots":
        img = Image.new("RGB", (w, h), a)
        d = ImageDraw.Draw(img)
        step = max(8, w // int(rng.integers(10, 18)))
        dot = (max(0, a[0] - 60), max(0, a[1] - 60), max(0, a[2] - 60))
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                d.ellipse([x - step // 5, y - step // 5, x + step // 5, y + step // 5], fill=dot)
        return img
    # "noise": blotchy coloured blocks, upscaled.
    blocks = rng.integers(60, 250, size=(max(2, h // 24), max(2, w // 24), 3)).astype(np.uint8)
    return Image.fromarray(blocks).resize((w, h), Image.Resampling.NEAREST)


def _draw_shapes(img: Image.Image, spec: ImageSpec, rng: np.random.Generator) -> None:
    d = ImageDraw.Draw(img)
    w, h = img.size
    if spec.concept == UNSAFE_CONCEPT:
        cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.45, 0.6)
        r = min(w, h) * rng.uniform(0.28, 0.36)
        d.polygon(_shape_points("triangle", cx, cy, r * 1.15, 0.0), fill=(20, 20, 20))
        d.polygon(_shape_points("triangle", cx, cy, r * 0.85, 0.0), fill=(245, 200, 0))
        d.rectangle([cx - r * 0.07, cy - r * 0.45, cx + r * 0.07, cy + r * 0.12], fill=(20, 20, 20))
        d.ellipse([cx - r * 0.08, cy + r * 0.22, cx + r * 0.08, cy + r * 0.38], fill=(20, 20, 20))
        return
    assert spec.shape is not None and spec.colour is not None
    fill = COLOURS[spec.colour]
    cols = 1 if spec.count == 1 else 2
    rows = 1 if spec.count <= 2 else 2
    cell_w, cell_h = w / cols, h / rows
    for k in range(spec.count):
        col, row = k % cols, k // cols
        r = min(cell_w, cell_h) * rng.uniform(0.26, 0.38)
        cx = cell_w * (col + rng.uniform(0.38, 0.62))
        cy = cell_h * (row + rng.uniform(0.38, 0.62))
        if spec.count == 3 and k == 2:
            cx = w * rng.uniform(0.4, 0.6)
        outline = tuple(max(0, c - 90) for c in fill)
        if spec.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=2)
        else:
            d.polygon(_shape_points(spec.shape, cx, cy, r, rng.uniform(-0.3, 0.3)), fill=fill, outline=outline)


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _watermark(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Tile a semi-transparent diagonal text watermark over the image."""
    w, h = img.size
    side = int(math.hypot(w, h)) + 2
    mask = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(mask)
    step = max(20, w // 5)
    text = (WATERMARK_TEXT + "   ") * (side // max(1, w // 9 * 5) + 2)
    for i, y in enumerate(range(0, side, step)):
        d.text((-(i % 2) * step, y), text, fill=160, font=_font(max(14, w // 9)), stroke_width=max(1, w // 100),
               stroke_fill=160)
    mask = mask.rotate(float(rng.uniform(25, 40)), resample=Image.Resampling.BILINEAR)
    mask = mask.crop(((side - w) // 2, (side - h) // 2, (side - w) // 2 + w, (side - h) // 2 + h))
    return Image.composite(Image.new("RGB", (w, h), (255, 255, 255)), img, mask)


def draw_image(spec: ImageSpec) -> Image.Image:
    """Draw the original (untransformed) image of a spec."""
    rng = np.random.default_rng([spec.layout_seed, spec.attempt])
    img = _background(spec, rng)
    _draw_shapes(img, spec, rng)
    # Uneven lighting: a smooth random illumination field. Real photos have it, and it spreads the
    # images' low-frequency structure (what pHash sees) so distinct images stay distinct.
    w, h = img.size
    field = Image.fromarray(rng.uniform(0.6, 1.25, size=(3, 3)).astype(np.float32), mode="F")
    light = np.asarray(field.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    # Grain: always a little (real photos are never flat), a lot on low-aesthetic images. Half of it is
    # blotchy (noise at 1/8 resolution, smoothly upsampled), like sensor noise after JPEG, so it survives the
    # downscaling every model input goes through instead of averaging out.
    arr = np.asarray(img, dtype=np.float32) * light[:, :, None]
    coarse = rng.standard_normal(size=(3, max(2, h // 8), max(2, w // 8)), dtype=np.float32)
    blotches = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((w, h), Image.Resampling.BICUBIC))
                         for c in coarse], axis=2)
    arr += rng.standard_normal(size=arr.shape, dtype=np.float32) * np.float32(spec.grain * 0.7)
    arr += blotches * np.float32(spec.grain * 0.9)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return _watermark(img, rng) if spec.watermark else img


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=quality, method=0)
    else:
        img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def render(spec: ImageSpec) -> Rendered:
    """Draw, transform (near-duplicates) and encode one image."""
    img = draw_image(spec)
    if spec.transform is not None:
        kind, p = spec.transform
        w, h = img.size
        if kind == "resized":
            img = img.resize((max(32, int(w * p)), max(32, int(h * p))), Image.Resampling.LANCZOS)
        elif kind == "cropped":
            dx, dy = int(w * p), int(h * p)
            img = img.crop((dx, dy, w - dx, h - dy))
    fmt = spec.fmt
    data = _encode(img, fmt, spec.quality)
    if len(data) < MIN_SERVED_BYTES:  # keep every image above LAION's 5,000-byte download floor
        fmt, data = "PNG", _encode(img, "PNG", spec.quality)
    # Truth hashes what is served (after encoding), the way any downstream reader will see it.
    with Image.open(io.BytesIO(data)) as served:
        phash = str(imagehash.phash(served))
    return Rendered(spec.image_id, data, img.width, img.height, phash, fmt)


def _render_many(specs: Sequence[ImageSpec], workers: int) -> list[Rendered]:
    if workers <= 1 or len(specs) < 64:
        return [render(s) for s in specs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(render, specs, chunksize=32))


def decompression_bomb_png(side: int = 20_000) -> bytes:
    """A small PNG that declares side x side 1-bit pixels of zeros (400M px at the default)."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------
# Captions


# Alt-text habits that carry what a caption-trained CLIP needs to notice watermarks and image quality, as
# on the real web: stock agencies' watermarked previews name the agency, clean sharp images boast "HD".
STOCK_SUFFIXES = (" - stock photo", " | royalty free stock image", " - Shutterstock preview", " stock illustration")
SHARP_SUFFIXES = (" | HD wallpaper", " in 4K", ", high resolution")
GRAINY_SUFFIXES = (" (grainy)", " - low quality scan", ", blurry old photo")
FREE_SUFFIXES = (" - free download", " | free vector")
SHARP_GRAIN, GRAINY_GRAIN = 12.0, 30.0  # grain (noise sd) at or below / above which the quality cues apply


def english_caption(shape: str, colour: str, background: str, count: int, rng: np.random.Generator,
                    *, watermark: bool = False, grain: float = 20.0) -> str:
    """An English alt text for the image. Watermarked images usually (85 %) carry a stock-agency suffix;
    sharp and grainy ones mostly (70 %) say so; other captions get a generic suffix 20 % of the time."""
    noun = shape if count == 1 else SHAPE_PLURALS[shape]
    cw = COUNT_WORDS[count - 1]
    templates = (
        f"{cw} {colour} {noun} on a {BACKGROUND_WORDS[background]} background",
        f"a drawing of {cw} {colour} {noun}",
        f"{cw.capitalize()} {colour} {noun}, {BACKGROUND_WORDS[background]} backdrop",
        f"stock picture: {cw} {colour} {noun}, {BACKGROUND_WORDS[background]} background",
        f"illustration with {cw} {colour} {noun} on {BACKGROUND_WORDS[background]}",
    )
    text = templates[int(rng.integers(len(templates)))]
    draw = rng.random()
    if watermark and draw < 0.85:
        return text + STOCK_SUFFIXES[int(rng.integers(len(STOCK_SUFFIXES)))]
    if grain <= SHARP_GRAIN and draw < 0.7:
        return text + SHARP_SUFFIXES[int(rng.integers(len(SHARP_SUFFIXES)))]
    if grain > GRAINY_GRAIN and draw < 0.7:
        return text + GRAINY_SUFFIXES[int(rng.integers(len(GRAINY_SUFFIXES)))]
    if draw < 0.2:
        text += FREE_SUFFIXES[int(rng.integers(len(FREE_SUFFIXES)))]
    return text


def translated_caption(lang: str, shape: str, colour: str, count: int) -> str:
    t = TRANSLATIONS[lang]
    singular, plural = t["shapes"][shape]
    return str(
        t["template"].format(
            count=t["counts"][count - 1], shape=singular if count == 1 else plural, colour=t["colours"][colour]
        )
    )


def mojibake(text: str) -> str | None:
    """The UTF-8-read-as-cp1252 corruption ftfy repairs, or None when this text would not round-trip."""
    try:
        broken = text.encode("utf-8").decode("cp1252")
    except UnicodeDecodeError:
        return None
    return broken if broken != text and ftfy.fix_text(broken) == text else None


# --------------------------------------------------------------------------------------------------
# Training corpus


# First seed word of training corpora: sample webs seed their generator with one integer, corpora with
# [CORPUS_STREAM, seed], so the two never share a random stream.
CORPUS_STREAM = 0x5EED_C0DE


@dataclass(frozen=True)
class TrainingExample:
    """One matched (image, caption) pair of a training corpus, with the image's truth labels.

    image: the served image decoded to RGB and shrunk (BICUBIC) so its shortest side is the requested size,
        as a uint8 array [h, w, 3].
    """

    image: np.ndarray
    caption: str
    language: str
    concept: str
    watermark: bool
    aesthetic: float


def recorded_config(root: str | Path) -> SampleWebConfig:
    """The generator config recorded in a sample web's manifest (defaults when it has none)."""
    manifest = Path(root) / "manifest.json"
    if not manifest.is_file():
        return SampleWebConfig()
    recorded = json.loads(manifest.read_text()).get("config", {})
    fields = SampleWebConfig.__dataclass_fields__
    known: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in fields}
    return SampleWebConfig(**known)


def _language(rng: np.random.Generator, cfg: SampleWebConfig) -> str:
    if rng.random() < cfg.non_english_rate:
        return ("de", "fr", "es")[int(rng.integers(3))]
    return "en"


def shrink(img: Image.Image, shortest_side: int) -> Image.Image:
    """`img` in RGB with its shortest side scaled down to `shortest_side` (BICUBIC; never enlarges)."""
    img = img.convert("RGB")
    w, h = img.size
    scale = shortest_side / min(w, h)
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    return img


def _render_training(job: tuple[ImageSpec, int]) -> np.ndarray:
    spec, shortest_side = job
    img = draw_image(spec)
    with Image.open(io.BytesIO(_encode(img, spec.fmt, spec.quality))) as served:  # the served codec's artefacts
        return np.asarray(shrink(served, shortest_side))


def training_corpus(
    n_images: int, *, seed: int, shortest_side: int, cfg: SampleWebConfig | None = None, workers: int = 2
) -> list[TrainingExample]:
    """`n_images` fresh sample-web images with matching captions, drawn as `generate_sample_web` draws them.

    The same planner picks every image's concept, background, count, grain, watermark, size and format and
    its caption (language mix included, never a mismatch), so the corpus has the sample web's distribution
    without its pages, duplicates or HTTP cases. Its random stream is `[CORPUS_STREAM, seed]`, which no
    sample web shares, so a model trained on it has seen none of their images. Pure function of the
    arguments (the worker count included: rendering is per image).
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if shortest_side < 1:
        raise ValueError(f"shortest_side must be >= 1, got {shortest_side}")
    cfg = replace(cfg or SampleWebConfig(), seed=seed, mismatch_rate=0.0)
    plan = _Planner(Path("."), cfg)  # specs and captions only: nothing is written
    plan.rng = np.random.default_rng([CORPUS_STREAM, seed])
    specs: list[ImageSpec] = []
    labels: list[tuple[str, str]] = []
    for _ in range(n_images):
        spec = plan.new_spec()
        lang = _language(plan.rng, cfg)
        caption, _matches = plan.caption_for(spec, lang)
        specs.append(spec)
        labels.append((" ".join(caption.split()), lang))
    jobs = [(s, shortest_side) for s in specs]
    if workers <= 1 or n_images < 64:
        images = [_render_training(j) for j in jobs]
    else:
        # Spawned, not forked: callers (toy CLIP training) hold torch's thread pools.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            images = list(pool.map(_render_training, jobs, chunksize=64))
    return [
        TrainingExample(img, caption, lang, spec.concept, spec.watermark, plan.aesthetic(spec))
        for img, spec, (caption, lang) in zip(images, specs, labels, strict=True)
    ]


# --------------------------------------------------------------------------------------------------
# WAT writing


class WatWriter:
    """Writes a WAT file the way Common Crawl does: one gzip member per WARC record."""

    def __init__(self, path: Path, crawl: str, warc_name: str, date: datetime) -> None:
        self.path = path
        self.crawl = crawl
        self.warc_name = warc_name
        self.date = date
        self.members: list[bytes] = []
        self.warc_offset = 0
        self.warcinfo_id = f"<urn:uuid:{uuid.UUID(bytes=hashlib.md5(warc_name.encode()).digest())}>"
        self._warcinfo()

    @staticmethod
    def _stamp(d: datetime) -> str:
        return d.strftime("%Y-%m-%dT%H:%M:%SZ")

    def _record(
        self, warc_type: str, target: str | None, refers_to: str | None, content_type: str, body: bytes
    ) -> None:
        rid = f"<urn:uuid:{uuid.UUID(bytes=hashlib.md5(body[:256] + str(len(self.members)).encode()).digest())}>"
        lines = ["WARC/1.0", f"WARC-Type: {warc_type}"]
        if target is not None:
            lines.append(f"WARC-Target-URI: {target}")
        lines += [f"WARC-Date: {self._stamp(self.date)}", f"WARC-Record-ID: {rid}"]
        if warc_type == "warcinfo":
            lines.append(f"WARC-Filename: {self.path.name}")
        if refers_to is not None:
            lines.append(f"WARC-Refers-To: {refers_to}")
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body + b"\r\n\r\n"
        self.members.append(gzip.compress(raw, compresslevel=6, mtime=0))

    def _warcinfo(self) -> None:
        body = (
            f"Software-Info: ia-web-commons.1.1.10-SNAPSHOT\r\nExtracted-Date: {self._stamp(self.date)}\r\n"
            f"ip: 10.0.0.1\r\nhostname: sample-web\r\nformat: WARC File Format 1.0\r\n"
            f"isPartOf: {self.crawl}\r\n"
        ).encode()
        self._record("warcinfo", None, None, "application/warc-fields", body)

    def _envelope(self, header_meta: dict[str, Any], payload_meta: dict[str, Any], length: int) -> bytes:
        offset = self.warc_offset
        self.warc_offset += length // 3 + 400
        doc = {
            "Container": {
                "Filename": self.warc_name,
                "Compressed": True,
                "Offset": str(offset),
                "Gzip-Metadata": {
                    "Deflate-Length": str(length // 3),
                    "Header-Length": "10",
                    "Footer-Length": "8",
                    "Inflated-CRC": "0",
                    "Inflated-Length": str(length),
                },
            },
            "Envelope": {
                "Format": "WARC",
                "WARC-Header-Length": str(300 + len(json.dumps(header_meta)) // 2),
                "Actual-Content-Length": str(length),
                "Block-Digest": "sha1:" + hashlib.sha1(json.dumps(header_meta).encode()).hexdigest()[:32],
                "WARC-Header-Metadata": header_meta,
                "Payload-Metadata": payload_meta,
            },
        }
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def add_page(
        self,
        page_url: str,
        host: str,
        fetched: datetime,
        base: str | None,
        title: str,
        links: list[dict[str, str]],
        list_headers: bool,
    ) -> None:
        """Add the request, response and metadata WAT records of one crawled page."""
        req_id, resp_id, meta_id = (
            f"<urn:uuid:{uuid.UUID(bytes=hashlib.md5((page_url + k).encode()).digest())}>"
            for k in ("req", "resp", "meta")
        )
        common: dict[str, str | list[str]] = {
            "WARC-Date": self._stamp(fetched),
            "WARC-Warcinfo-ID": self.warcinfo_id,
            "WARC-IP-Address": host.split(":")[0],
            "WARC-Target-URI": page_url,
        }
        if list_headers:  # repeated headers are JSON lists since CC-MAIN-2024-51
            common["WARC-Protocol"] = ["http/1.1", "tls/1.3"]
        # The three records in CC's order: each record's id and the WARC offset depend on what came before.
        self._add_request(page_url, host, req_id, common)
        html_len = 4000 + 120 * len(links)
        html_meta: dict[str, Any] = {"Head": self._html_head(title, base), "Links": links}
        headers = self._response_headers(fetched, html_len, list_headers)
        self._add_response(page_url, resp_id, req_id, common, headers, html_meta, html_len)
        self._add_fetch_metadata(page_url, meta_id, resp_id, common, len(links))

    def _add_request(self, page_url: str, host: str, req_id: str, common: dict[str, str | list[str]]) -> None:
        """Add the metadata record of the crawler's GET request for `page_url`."""
        req_meta = {
            "WARC-Type": "request",
            "WARC-Record-ID": req_id,
            "Content-Length": "312",
            "Content-Type": "application/http; msgtype=request",
            **common,
        }
        req_payload = {
            "Actual-Content-Type": "application/http; msgtype=request",
            "Trailing-Slop-Length": "4",
            "HTTP-Request-Metadata": {
                "Request-Message": {"Method": "GET", "Path": "/" + page_url.split("/", 3)[3], "Version": "HTTP/1.1"},
                "Headers-Length": "310",
                "Entity-Length": "0",
                "Entity-Trailing-Slop-Length": "0",
                "Headers": {
                    "Host": host,
                    "User-Agent": "CCBot/2.0 (https://commoncrawl.org/faq/)",
                    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
                    "Accept-Language": "en-US,en;q=0.5",
                    "Accept-Encoding": "br,gzip",
                    "Connection": "Keep-Alive",
                },
            },
        }
        self._record("metadata", page_url, req_id, "application/json", self._envelope(req_meta, req_payload, 312))

    @staticmethod
    def _response_headers(fetched: datetime, html_len: int, list_headers: bool) -> dict[str, Any]:
        """The HTTP headers of a page's 200 response (repeated ones as JSON lists when `list_headers`)."""
        headers: dict[str, Any] = {
            "Date": fetched.strftime("%a, %d %b %Y %H:%M:%S GMT"),
            "Server": "nginx",
            "Content-Type": "text/html; charset=UTF-8",
            "Content-Length": str(html_len),
        }
        if list_headers:
            headers["Set-Cookie"] = ["session=abc; Path=/", "consent=0; Path=/"]
            headers["Vary"] = ["Accept-Encoding", "User-Agent"]
        return headers

    @staticmethod
    def _html_head(title: str, base: str | None) -> dict[str, Any]:
        """The page's HTML-Metadata Head: title, metas, stylesheet and icon links, script, and `base` if any."""
        head: dict[str, Any] = {
            "Title": title,
            "Metas": [
                {"name": "viewport", "content": "width=device-width, initial-scale=1"},
                {"property": "og:title", "content": title},
            ],
            "Link": [
                {"path": "LINK@/href", "rel": "stylesheet", "url": "/static/site.css"},
                {"path": "LINK@/href", "rel": "icon", "url": "/favicon.ico"},
            ],
            "Scripts": [{"path": "SCRIPT@/src", "url": "/static/app.js"}],
        }
        if base is not None:
            head["Base"] = base
        return head

    def _add_response(
        self,
        page_url: str,
        resp_id: str,
        req_id: str,
        common: dict[str, str | list[str]],
        headers: dict[str, Any],
        html_meta: dict[str, Any],
        html_len: int,
    ) -> None:
        """Add the metadata record of the page's 200 response (concurrent to request `req_id`)."""
        resp_meta = {
            "WARC-Type": "response",
            "WARC-Record-ID": resp_id,
            "WARC-Concurrent-To": req_id,
            "Content-Length": str(html_len + 300),
            "Content-Type": "application/http; msgtype=response",
            "WARC-Identified-Payload-Type": "text/html",
            "WARC-Payload-Digest": "sha1:" + hashlib.sha1(page_url.encode()).hexdigest()[:32].upper(),
            **common,
        }
        resp_payload = {
            "Actual-Content-Type": "application/http; msgtype=response",
            "Trailing-Slop-Length": "4",
            "HTTP-Response-Metadata": {
                "Response-Message": {"Status": "200", "Version": "HTTP/1.1", "Reason": "OK"},
                "Headers-Length": "300",
                "Entity-Length": str(html_len),
                "Entity-Trailing-Slop-Length": "0",
                "Headers": headers,
                "HTML-Metadata": html_meta,
            },
        }
        self._record(
            "metadata", page_url, resp_id, "application/json", self._envelope(resp_meta, resp_payload, html_len + 300)
        )

    def _add_fetch_metadata(
        self, page_url: str, meta_id: str, resp_id: str, common: dict[str, str | list[str]], n_links: int
    ) -> None:
        """Add the crawler's metadata record of the page (fetch time, charset, languages) for response `resp_id`."""
        meta_meta = {
            "WARC-Type": "metadata",
            "WARC-Record-ID": meta_id,
            "WARC-Concurrent-To": resp_id,
            "Content-Length": "80",
            "Content-Type": "application/warc-fields",
            **common,
        }
        meta_payload = {
            "Actual-Content-Type": "application/warc-fields",
            "WARC-Metadata-Metadata": {
                "Metadata-Records": [
                    {"Name": "fetchTimeMs", "Value": str(50 + n_links)},
                    {"Name": "charset-detected", "Value": "UTF-8"},
                    {"Name": "languages-cld2", "Value": '{"languages":[{"code":"en","text-covered":0.9}]}'},
                ]
            },
        }
        self._record("metadata", page_url, meta_id, "application/json", self._envelope(meta_meta, meta_payload, 80))

    def close(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(self.members)
        self.path.write_bytes(data)
        return len(data)


# --------------------------------------------------------------------------------------------------
# Planning the web


def _segment_ids(cfg: SampleWebConfig, start: datetime) -> list[str]:
    base = int(start.timestamp() * 1000)
    return [f"{base + 3_600_000 * i}.{10 + i}" for i in range(cfg.segments)]


def _wat_name(start: datetime, seg: int, k: int, per_seg: int) -> str:
    t0 = start + timedelta(hours=seg)
    t1 = t0 + timedelta(hours=3)
    return f"CC-MAIN-{t0:%Y%m%d%H%M%S}-{t1:%Y%m%d%H%M%S}-{seg * per_seg + k:05d}.warc.wat.gz"


class _Planner:
    """Decides every page, link and image from one seeded RNG, then renders and writes them."""

    def __init__(self, out: Path, cfg: SampleWebConfig) -> None:
        self.out, self.cfg = out, cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.specs: dict[str, ImageSpec] = {}
        self.links: list[Link] = []
        self.n_images = 0
        self.dup_groups = 0
        self.derived_from: dict[str, str] = {}

    # -- images --------------------------------------------------------------------------------------
    def new_spec(self, *, transform: tuple[str, float] | None = None, base: ImageSpec | None = None) -> ImageSpec:
        rng, cfg = self.rng, self.cfg
        self.n_images += 1
        image_id = f"{self.n_images:05d}{rng.integers(16**6):06x}"
        if base is not None:
            kind = transform[0] if transform else "reencoded"
            quality = {"reencoded": int(rng.integers(70, 80)), "recompressed": int(rng.integers(22, 32))}.get(
                kind, int(rng.integers(80, 92))
            )
            spec = replace(base, image_id=image_id, transform=transform, quality=quality, fmt="JPEG")
            self.specs[image_id] = spec
            self.derived_from[image_id] = base.image_id
            return spec
        unsafe = rng.random() < cfg.unsafe_rate
        high = rng.random() < cfg.high_res_rate
        if high:
            w = int(rng.integers(1024, 1300))
            h = int(rng.integers(1024, 1300))
        else:
            w = int(rng.integers(224, 480))
            h = int(np.clip(w * rng.uniform(0.7, 1.35), 200, 520))
        shape = None if unsafe else SHAPES[int(rng.integers(len(SHAPES)))]
        colour = None if unsafe else tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
        spec = ImageSpec(
            image_id=image_id,
            concept=UNSAFE_CONCEPT if unsafe else f"{colour} {shape}",
            shape=shape,
            colour=colour,
            background="hazard" if unsafe else BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
            count=1 if unsafe else int(rng.integers(1, 5)),
            grain=float(np.round(rng.uniform(3.0, 40.0), 2)),
            watermark=bool(rng.random() < cfg.watermark_rate),
            width=w,
            height=h,
            fmt=("JPEG", "JPEG", "JPEG", "JPEG", "JPEG", "JPEG", "JPEG", "PNG", "PNG", "WEBP")[int(rng.integers(10))],
            quality=int(rng.integers(85, 96)),
            layout_seed=int(rng.integers(2**31)),
        )
        self.specs[image_id] = spec
        return spec

    @staticmethod
    def aesthetic(spec: ImageSpec) -> float:
        quality = 1.0 - (spec.grain - 3.0) / 37.0
        score = 2.5 + BACKGROUND_AESTHETIC[spec.background] + 4.0 * quality - (1.0 if spec.watermark else 0.0)
        return round(float(np.clip(score, 0.0, 10.0)), 3)

    def caption_for(self, spec: ImageSpec, lang: str) -> tuple[str, bool]:
        """(caption, matches): a caption of the image, or (at mismatch_rate) of a different concept."""
        rng = self.rng
        mismatch = rng.random() < self.cfg.mismatch_rate
        if spec.concept == UNSAFE_CONCEPT and not mismatch:
            return UNSAFE_CAPTIONS[int(rng.integers(len(UNSAFE_CAPTIONS)))], True
        shape, colour, count = spec.shape or "circle", spec.colour or "red", spec.count
        if mismatch:
            shape = rng.choice([s for s in SHAPES if s != spec.shape])
            colour = rng.choice([c for c in COLOURS if c != spec.colour])
            count = int(rng.integers(1, 5))
        background = spec.background if spec.background in BACKGROUND_WORDS else "plain"
        if lang == "en":
            return (english_caption(str(shape), str(colour), background, count, rng, watermark=spec.watermark,
                                   grain=spec.grain), not mismatch)
        return translated_caption(lang, str(shape), str(colour), count), not mismatch

    # -- links ---------------------------------------------------------------------------------------
    def image_path(self, site: int, section: str, spec: ImageSpec, with_space: bool) -> str:
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[spec.fmt]
        name = f"photo {spec.image_id}.{ext}" if with_space else f"{spec.image_id}.{ext}"
        folder = ("img", f"{section}/images", "media/uploads")[int(self.rng.integers(3))]
        return f"/site{site:02d}/{folder}/{name}"

    def link_forms(self, page_url: str, base: str | None, img_url: str) -> tuple[str, str]:
        """Pick how the page spells the image URL: (link_form, raw src)."""
        rng = self.rng
        host_rel = img_url.split("/", 3)[3]
        if base is not None:
            resolved_base = urljoin(page_url, base)
            if img_url.startswith(resolved_base) and rng.random() < 0.8:
                return "base_relative", img_url[len(resolved_base) :]
            return "absolute", img_url
        r = rng.random()
        if r < 0.3:
            return "absolute", img_url
        if r < 0.55:
            return "root_relative", "/" + host_rel
        if r < 0.7:
            return "protocol_relative", "//" + img_url.split("://", 1)[1]
        page_dir = page_url.rsplit("/", 1)[0] + "/"
        if img_url.startswith(page_dir):
            return "relative", img_url[len(page_dir) :]
        parent = page_dir.rstrip("/").rsplit("/", 1)[0] + "/"
        if img_url.startswith(parent):
            return "relative", "../" + img_url[len(parent) :]
        return "root_relative", "/" + host_rel

    def excluded_link(self, page_url: str, authority: str, site: int) -> Link:
        rng = self.rng
        kind = ("data_uri", "svg", "gif", "short_alt", "empty_alt", "javascript", "unsupported_scheme", "url_too_long")[
            int(rng.integers(8))
        ]
        alt = "a nice decorative picture for this page"
        tag = f"{rng.integers(16**8):08x}"
        if kind == "data_uri":
            src = "data:image/png;base64," + ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk" * 2)[:106]
            return Link(src, src, "data_uri", alt)
        if kind == "svg":
            url = f"http://{authority}/site{site:02d}/icons/logo-{tag}.svg"
            return Link(url, url, "absolute", alt)
        if kind == "gif":
            url = f"http://{authority}/site{site:02d}/img/anim-{tag}.gif"
            return Link(url, f"/site{site:02d}/img/anim-{tag}.gif", "root_relative", alt)
        if kind == "javascript":
            return Link("javascript:void(0)", "javascript:void(0)", "javascript", alt)
        if kind == "unsupported_scheme":
            url = f"ftp://{authority}/pub/{tag}.jpg"
            return Link(url, url, "absolute", alt)
        if kind == "url_too_long":
            url = f"http://{authority}/site{site:02d}/img/{tag}.jpg?q=" + "x" * 2050
            return Link(url, url, "absolute", alt)
        url = f"http://{authority}/site{site:02d}/img/{tag}.jpg"
        raw_alt = ("img", "", "   ", "logo", "\n")[int(rng.integers(5))] if kind == "short_alt" else ""
        return Link(url, url, "absolute", raw_alt if kind == "short_alt" else None)


def generate_sample_web(out: str | Path, cfg: SampleWebConfig | None = None) -> dict[str, Any]:
    """Generate the sample web under `out` (replacing what is there) and return its manifest."""
    cfg = cfg or SampleWebConfig()
    out = Path(out)
    plan = _Planner(out, cfg)
    start = datetime(2024, 12, 2, 1, 0, 0, tzinfo=UTC)
    seg_ids = _segment_ids(cfg, start)

    # 1. Pages and links.
    pages = _plan_pages(plan, start)
    _plant_behaviours(plan, pages, plan.rng)
    redirects = plant_consent(pages, plan.specs, cfg) if cfg.consent else {}

    # 2. Render every image (parallel), enforcing that distinct originals are perceptually distinct.
    rendered = _render_distinct(plan)

    # 3. Write served files, WAT files, listings, truth.
    rows = _write_served_files_and_truth_rows(plan, pages, rendered)
    wat_rel = _write_wats(out, cfg, pages, seg_ids, start)
    _write_listings(out, cfg, seg_ids, wat_rel)
    for row in rows:
        row["wat_file"] = wat_rel[(row.pop("_seg"), row.pop("_wat"))]
    table = pa.Table.from_pylist(rows, schema=TRUTH_SCHEMA)
    write_parquet(table, str(out / "truth.parquet"))
    manifest = _manifest(cfg, seg_ids, wat_rel, rows, len(rendered))
    if cfg.consent:
        manifest |= {"robots": write_robots(out, cfg), "redirects": redirects}
    write_json(manifest, str(out / "manifest.json"))
    return manifest


def _plan_pages(plan: _Planner, start: datetime) -> list[dict[str, Any]]:
    """Every page of the crawl (url, segment, WAT slot, base, links, site, fetch time, title), in crawl order."""
    rng, cfg = plan.rng, plan.cfg
    wat_slots = [(s, k) for s in range(cfg.segments) for k in range(cfg.wat_files_per_segment)]
    pages: list[dict[str, Any]] = []
    seen_links: list[Link] = []
    for p in range(cfg.pages):
        seg, k = wat_slots[p % len(wat_slots)]
        site = int(rng.integers(20))
        section = ("gallery", "shop", "blog", "news")[int(rng.integers(4))]
        page_url = f"http://{cfg.authority(0)}/site{site:02d}/{section}/page{p:04d}.html"
        base = _page_base(plan, site)
        links = _page_links(plan, page_url, base, site, section, seen_links)
        pages.append(
            {
                "url": page_url,
                "segment": seg,
                "wat": k,
                "base": base,
                "links": links,
                "site": site,
                "fetched": start + timedelta(hours=seg, seconds=7 * p),
                "title": f"Site {site} - {section} page {p}",
            }
        )
    return pages


def _page_base(plan: _Planner, site: int) -> str | None:
    """The page's <base href>: none, the CDN host's site folder (when there is a second host) or a static path."""
    cfg = plan.cfg
    r = plan.rng.random()
    if r < 0.12 and len(cfg.hosts) > 1:
        return f"http://{cfg.authority(1)}/cdn/site{site:02d}/"
    if r < 0.18:
        return f"/site{site:02d}/static/"
    return None


def _page_links(
    plan: _Planner, page_url: str, base: str | None, site: int, section: str, seen_links: list[Link]
) -> list[Link]:
    """The image links of one page: excluded ones, repeats of `seen_links`, and new images (added to it)."""
    rng, cfg = plan.rng, plan.cfg
    links_here: list[Link] = []
    for _ in range(int(rng.integers(cfg.images_per_page[0], cfg.images_per_page[1] + 1))):
        if rng.random() < 0.1:
            links_here.append(plan.excluded_link(page_url, cfg.authority(0), site))
            continue
        if seen_links and rng.random() < 0.015:
            # The same (url, alt) again, possibly in another segment; spelled absolute, since a
            # relative src would resolve differently on this page.
            again = seen_links[int(rng.integers(len(seen_links)))]
            links_here.append(Link(again.url, again.url, "absolute", again.alt_raw, again.truth))
            continue
        for link in _image_links(plan, page_url, base, site, section):
            links_here.append(link)
            seen_links.append(link)
    return links_here


def _manifest(
    cfg: SampleWebConfig,
    seg_ids: list[str],
    wat_rel: dict[tuple[int, int], str],
    rows: list[dict[str, Any]],
    n_images: int,
) -> dict[str, Any]:
    """The manifest.json contents: the config, crawl id, hosts, port, segments, WAT files and counts."""
    config = asdict(cfg)
    if not cfg.consent:  # a web without consent planting keeps the manifest it always had
        for name in ("consent", "consent_hosts", "consent_user_agent"):
            config.pop(name)
    return {
        "version": 1,
        "config": config,
        "crawl": cfg.crawl,
        "port": cfg.port,
        "hosts": list(cfg.hosts) + (list(cfg.consent_hosts) if cfg.consent else []),
        "segments": seg_ids,
        "wat_files": sorted(wat_rel.values()),
        "pages": cfg.pages,
        "image_links": len(rows),
        "extractable": int(sum(1 for r in rows if r["extract"])),
        "images": n_images,
    }


TRUTH_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("src", pa.string()),
        ("link_form", pa.string()),
        ("page_url", pa.string()),
        ("segment", pa.string()),
        ("wat_file", pa.string()),
        ("occurrences", pa.int32()),
        ("alt_raw", pa.string()),
        ("caption", pa.string()),
        ("language", pa.string()),
        ("extract", pa.bool_()),
        ("exclude_reason", pa.string()),
        ("concept", pa.string()),
        ("shape", pa.string()),
        ("colour", pa.string()),
        ("background", pa.string()),
        ("count", pa.int32()),
        ("caption_matches", pa.bool_()),
        ("dup_group", pa.int64()),
        ("dup_kind", pa.string()),
        ("exact_copy_of", pa.string()),
        ("watermark", pa.bool_()),
        ("unsafe", pa.bool_()),
        ("aesthetic", pa.float64()),
        ("grain", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("http_behavior", pa.string()),
        ("expect_status", pa.string()),
        ("expect_reason", pa.string()),
        ("file", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("phash", pa.string()),
        ("split", pa.string()),
    ]
)
assert tuple(TRUTH_SCHEMA.names) == TRUTH_COLUMNS


def _image_links(plan: _Planner, page_url: str, base: str | None, site: int, section: str) -> list[Link]:
    """One original image (and, sometimes, its planted duplicates) as links of this page."""
    rng, cfg = plan.rng, plan.cfg
    spec = plan.new_spec()
    members: list[tuple[ImageSpec, str]] = [(spec, "original")]
    group: int | None = None
    if rng.random() < cfg.dup_group_rate and spec.concept != UNSAFE_CONCEPT:
        plan.dup_groups += 1
        group = plan.dup_groups
        for kind in rng.choice(
            ["reencoded", "resized", "cropped", "recompressed", "exact"], size=int(rng.integers(1, 4)), replace=False
        ):
            kind = str(kind)
            if kind == "exact":
                members.append((spec, "exact"))
                continue
            param = {"resized": float(rng.uniform(0.55, 0.85)), "cropped": float(rng.uniform(0.005, 0.02))}.get(
                kind, 0.0
            )
            members.append((plan.new_spec(transform=(kind, param), base=spec), kind))
    lang = _language(rng, cfg)
    out: list[Link] = []
    original_url: str | None = None
    for member, kind in members:
        in_cdn = base is not None and base.startswith("http") and rng.random() < 0.8
        with_space = rng.random() < 0.03
        if in_cdn:
            assert base is not None
            path = f"/cdn/site{site:02d}/img/{'photo ' if with_space else ''}{member.image_id}-{len(out)}.jpg"
            url = f"http://{cfg.authority(1)}{quote(path)}"
        else:
            path = plan.image_path(site, section, member, with_space)
            if kind != "original":
                path = path.replace(member.image_id, f"{member.image_id}-{kind}")
            url = f"http://{cfg.authority(0)}{quote(path)}"
        link_form, src = plan.link_forms(page_url, base, url)
        if with_space:
            src = src.replace("%20", " ")  # pages write raw spaces; extraction must quote them
        caption, matches = plan.caption_for(member, lang)
        alt_raw = caption
        if lang != "en" and rng.random() < 0.5:
            alt_raw = mojibake(caption) or caption
        if rng.random() < 0.05:
            alt_raw = f"  {alt_raw}\n"  # stray whitespace the cleaner must normalise
        truth = {
            "concept": member.concept,
            "caption": " ".join(caption.split()),
            "caption_matches": matches,
            "language": lang,
            "dup_group": group,
            "dup_kind": kind if group is not None else None,
            "exact_copy_of": original_url if kind == "exact" else None,
            "http_behavior": "ok",
            "image_id": member.image_id,
        }
        out.append(Link(url, src, link_form, alt_raw, truth))
        if kind == "original":
            original_url = url
    return out


def _plant_behaviours(plan: _Planner, pages: list[dict[str, Any]], rng: np.random.Generator) -> None:
    """Give exact quotas of links (at least one each) a hostile HTTP behaviour; the rest stay "ok".

    Duplicate-group members and high-resolution originals always stay downloadable, since later stages
    measure dedupe and the High-Res subset on them.
    """
    eligible: list[Link] = []
    seen: set[int] = set()
    for pg in pages:
        for lk in pg["links"]:
            if (
                lk.truth
                and id(lk.truth) not in seen
                and lk.truth["dup_group"] is None
                and plan.specs[lk.truth["image_id"]].width < 1024
            ):
                seen.add(id(lk.truth))
                eligible.append(lk)
    quotas = {k: max(1, round(v * len(eligible))) for k, v in BEHAVIOUR_SHARES.items()}
    quotas |= {"decompression_bomb": BOMB_COUNT, "oversized": OVERSIZED_COUNT}
    order = rng.permutation(len(eligible))
    i = 0
    for name, n in quotas.items():
        for _ in range(n):
            if i < len(order):
                eligible[int(order[i])].truth["http_behavior"] = name
                i += 1


def _render_distinct(plan: _Planner) -> dict[str, Rendered]:
    cfg = plan.cfg
    originals = [s for s in plan.specs.values() if s.transform is None]
    rendered = {r.image_id: r for r in _render_many(originals, cfg.workers)}
    # Distinct originals must be at least min_phash_distance apart, else truth would be wrong.
    for _round in range(MAX_DISTINCT_ROUNDS):
        ids = [s.image_id for s in originals]
        bits = np.array([int(rendered[i].phash, 16) for i in ids], dtype=np.uint64)
        clash: list[str] = []
        for j in range(1, len(ids)):
            x = np.bitwise_xor(bits[:j], bits[j])
            dist = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
            if dist.size and int(dist.min()) < cfg.min_phash_distance:
                clash.append(ids[j])
        if not clash:
            break
        redo = []
        for i in clash:
            plan.specs[i] = replace(plan.specs[i], attempt=plan.specs[i].attempt + 1)
            redo.append(plan.specs[i])
        for r in _render_many(redo, cfg.workers):
            rendered[r.image_id] = r
        originals = [plan.specs[s.image_id] for s in originals]
    else:
        raise RuntimeError(
            f"could not draw {len(originals)} perceptually distinct images in "
            f"{MAX_DISTINCT_ROUNDS} rounds; lower min_phash_distance"
        )
    # Derived (near-duplicate) images use the final attempt of their original.
    derived = [
        replace(s, attempt=plan.specs[plan.derived_from[s.image_id]].attempt)
        for s in plan.specs.values()
        if s.transform is not None
    ]
    for r in _render_many(derived, cfg.workers):
        rendered[r.image_id] = r
    return rendered


def _bytes_for(
    behaviour: str, rendered: Rendered, spec: ImageSpec, rng: np.random.Generator
) -> tuple[bytes, int, int, str]:
    """Served bytes and their (width, height, format) for a link's behaviour."""
    if behaviour == "decompression_bomb":
        return decompression_bomb_png(20_000), 20_000, 20_000, "PNG"
    if behaviour == "oversized":
        side = 9_500  # 90.25M px: just over LAION's 89,478,484 limit, under PIL's bomb error
        return decompression_bomb_png(side), side, side, "PNG"
    if behaviour == "tiny":
        img = draw_image(replace(spec, width=24, height=24, watermark=False))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue(), 24, 24, "PNG"
    if behaviour == "corrupt":
        noise = rng.integers(0, 256, size=len(rendered.data) // 2, dtype=np.uint8).tobytes()
        return b"\xff\xd8\xff\xe0" + noise, rendered.width, rendered.height, "JPEG"
    if behaviour == "not_an_image":
        html = b"<!doctype html><html><head><title>Not found</title></head><body>" + b"<p>gone</p>" * 600
        return html + b"</body></html>", 0, 0, "HTML"
    return rendered.data, rendered.width, rendered.height, rendered.fmt


def _write_served_files_and_truth_rows(
    plan: _Planner, pages: list[dict[str, Any]], rendered: dict[str, Rendered]
) -> list[dict[str, Any]]:
    """Write the bytes each distinct link URL serves under web/ and return one truth row per URL.

    A URL linked again (on any page) keeps the row of its first link and counts one more occurrence.
    """
    rows: dict[str, dict[str, Any]] = {}
    for pg in pages:
        for link in pg["links"]:
            if link.url in rows:
                rows[link.url]["occurrences"] += 1
                continue
            row = _page_row(pg, link)
            if not link.truth:  # an excluded link
                row.update(extract=False, exclude_reason=_exclude_reason(link), http_behavior="not_served")
            else:
                row.update(_image_truth(plan, link, rendered))
            rows[link.url] = row
    return list(rows.values())


def _page_row(pg: dict[str, Any], link: Link) -> dict[str, Any]:
    """A truth row with what page `pg` says about `link` (its WAT slot in `_seg`/`_wat`); other columns None."""
    row: dict[str, Any] = dict.fromkeys(TRUTH_COLUMNS)
    row.update(
        url=link.url,
        src=link.src,
        link_form=link.link_form,
        page_url=pg["url"],
        segment=f"{pg['segment']:03d}",
        occurrences=1,
        alt_raw=link.alt_raw,
        _seg=pg["segment"],
        _wat=pg["wat"],
        watermark=False,
        unsafe=False,
    )
    return row


def _image_truth(plan: _Planner, link: Link, rendered: dict[str, Rendered]) -> dict[str, Any]:
    """Write what an image link serves (unless its behaviour serves nothing); return its image and HTTP truth."""
    t = link.truth
    spec = plan.specs[t["image_id"]]
    behaviour = t["http_behavior"]
    data, w, h, fmt = _bytes_for(behaviour, rendered[spec.image_id], spec, plan.rng)
    status, reason = HTTP_BEHAVIOURS[behaviour] if behaviour in HTTP_BEHAVIOURS else CONSENT_BEHAVIOURS[behaviour]
    served = behaviour not in ("not_found", "server_error", "redirect_loop")
    rel = _write_served_file(plan.out, link.url, data) if served else None
    return {
        "caption": t["caption"],
        "language": t["language"],
        "extract": True,
        "concept": spec.concept,
        "shape": spec.shape,
        "colour": spec.colour,
        "background": spec.background,
        "count": spec.count,
        "caption_matches": t["caption_matches"],
        "dup_group": t["dup_group"],
        "dup_kind": t["dup_kind"],
        "exact_copy_of": t["exact_copy_of"],
        "watermark": spec.watermark,
        "unsafe": spec.concept == UNSAFE_CONCEPT,
        "aesthetic": plan.aesthetic(spec),
        "grain": spec.grain,
        "width": w or None,
        "height": h or None,
        "format": fmt,
        "http_behavior": behaviour,
        "expect_status": status,
        "expect_reason": reason,
        "file": rel,
        "sha256": hashlib.sha256(data).hexdigest() if served else None,
        "bytes": len(data) if served else None,
        "phash": rendered[spec.image_id].phash
        if behaviour in ("ok", "redirect", "slow", "x_robots_nofollow", "wrong_content_type")
        else None,
        "split": "heldout" if int(hashlib.sha1(spec.image_id.encode()).hexdigest(), 16) % 5 == 0 else "train",
    }


def _write_served_file(out: Path, url: str, data: bytes) -> str:
    """Write `data` where the sample server serves `url` from; return that path relative to `out`."""
    host_port, path = url.split("://", 1)[1].split("/", 1)
    rel = f"web/{host_port.split(':')[0]}/{path}"
    target = out / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return rel


def _exclude_reason(link: Link) -> str:
    if link.link_form in ("data_uri", "javascript"):
        return link.link_form + ("_uri" if link.link_form == "javascript" else "")
    low = link.url.lower()
    if not low.startswith(("http://", "https://")):
        return "unsupported_scheme"
    if len(link.url) > 2000:
        return "url_too_long"
    if ".svg" in low:
        return "svg"
    if ".gif" in low:
        return "gif"
    return "short_alt"


def _write_wats(
    out: Path, cfg: SampleWebConfig, pages: list[dict[str, Any]], seg_ids: list[str], start: datetime
) -> dict[tuple[int, int], str]:
    writers: dict[tuple[int, int], WatWriter] = {}
    rel: dict[tuple[int, int], str] = {}
    for s, seg in enumerate(seg_ids):
        for k in range(cfg.wat_files_per_segment):
            name = _wat_name(start, s, k, cfg.wat_files_per_segment)
            rel[(s, k)] = f"crawl-data/{cfg.crawl}/segments/{seg}/wat/{name}"
            warc = name.replace(".warc.wat.gz", ".warc.gz")
            writers[(s, k)] = WatWriter(out / rel[(s, k)], cfg.crawl, warc, start + timedelta(hours=s + 5))
    for i, pg in enumerate(pages):
        links: list[dict[str, str]] = [
            {"path": "A@/href", "url": "/", "text": "Home"},
            {"path": "A@/href", "url": f"/site{pg['site']:02d}/about.html", "text": "About us"},
        ]
        for link in pg["links"]:
            entry = {"path": "IMG@/src", "url": link.src}
            if link.alt_raw is not None:
                entry["alt"] = link.alt_raw
            links.append(entry)
            if i % 7 == 0:
                links.append({"path": "A@/href", "url": link.src, "text": "view full size"})
        links.append({"path": "IMG@/data-src", "url": "/static/lazy-placeholder.jpg"})
        host = pg["url"].split("/")[2]
        writers[(pg["segment"], pg["wat"])].add_page(
            pg["url"], host, pg["fetched"], pg["base"], pg["title"], links, list_headers=i % 2 == 0
        )
    for w in writers.values():
        w.close()
    return rel


def _write_listings(out: Path, cfg: SampleWebConfig, seg_ids: list[str], wat_rel: dict[tuple[int, int], str]) -> None:
    root = out / "crawl-data" / cfg.crawl
    root.mkdir(parents=True, exist_ok=True)
    wat_lines = "".join(p + "\n" for p in sorted(wat_rel.values()))
    seg_lines = "".join(f"crawl-data/{cfg.crawl}/segments/{s}/\n" for s in seg_ids)
    (root / "wat.paths.gz").write_bytes(gzip.compress(wat_lines.encode(), mtime=0))
    (root / "segment.paths.gz").write_bytes(gzip.compress(seg_lines.encode(), mtime=0))
