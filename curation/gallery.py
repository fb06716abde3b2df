"""Image galleries for materialization metadata: samples read back from a partition's webdataset shards."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence

from PIL import Image, ImageDraw

from curation import records as R
from curation.io import filesystem
from curation.layout import Lake, Partition, join

TILE = 96


def read_sample_image(lake_root: str, part: Partition, shard: str, key: str) -> bytes | None:
    """The image bytes of sample `key` in `<shards_dir>/<shard>.tar`, or None when it is not there."""
    fs, path = filesystem(join(Lake(lake_root).shards_dir(part), f"{shard}.tar"))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            stem, _, ext = member.name.rpartition(".")
            if stem == key and ext in R.IMAGE_EXTENSIONS:
                extracted = tar.extractfile(member)
                return extracted.read() if extracted else None
    return None


def gallery_png(rows: Sequence[Sequence[tuple[bytes | None, str]]], *, title: str) -> bytes:
    """A grid of thumbnails as PNG bytes: one row per group (e.g. a duplicate cluster), each tile an image's
    bytes and a short label (missing or broken images draw as grey tiles)."""
    width = max((len(r) for r in rows), default=1) * (TILE + 4) + 4
    height = 22 + len(rows) * (TILE + 18)
    canvas = Image.new("RGB", (max(width, 200), height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=(40, 40, 40))
    for i, row in enumerate(rows):
        y = 22 + i * (TILE + 18)
        for j, (data, label) in enumerate(row):
            x = 4 + j * (TILE + 4)
            tile = Image.new("RGB", (TILE, TILE), (200, 200, 200))
            if data is not None:
                try:
                    with Image.open(io.BytesIO(data)) as img:
                        img.thumbnail((TILE, TILE))
                        tile.paste(img.convert("RGB"), ((TILE - img.width) // 2, (TILE - img.height) // 2))
                except (OSError, ValueError):
                    pass
            canvas.paste(tile, (x, y))
            draw.text((x, y + TILE + 2), label[:16], fill=(40, 40, 40))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
