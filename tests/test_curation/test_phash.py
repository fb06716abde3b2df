"""pHash: bit-identity with imagehash on varied generated images, per-record errors, hex format, parquet, CLI."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from curation import records as R
from curation.phash import (
    PATH,
    PhashConfig,
    add_phash_parser,
    find_images,
    from_hex,
    phash_bytes,
    phash_files,
    phash_images,
    to_hex,
    write_hashes,
)

KINDS = ("photo", "noise", "flat", "mirror", "lineart", "smooth")


def make_image(rng: np.random.Generator, kind: str, size: tuple[int, int]) -> Image.Image:
    """Small RGB images of the content kinds that matter: flat and mirror-symmetric ones put DCT coefficients
    exactly on the median (where only imagehash's own transform gives the same bits)."""
    w, h = size
    if kind == "photo":
        ramp = np.linspace(0, 1, h)[:, None, None]
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        px = (top * (1 - ramp) + bottom * ramp).repeat(w, axis=1) + rng.normal(0, 10, (h, w, 3))
        img = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(3, max(w, h) // 2 + 4))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        return img
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8))
    if kind == "flat":
        return Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    if kind == "mirror":
        half = rng.integers(0, 256, (h, max(w // 2, 1), 3)).astype(np.uint8)
        return Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1))
    if kind == "lineart":
        img = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(img)
        for _ in range(5):
            draw.line([int(v) for v in rng.integers(0, max(w, h), 4)], fill="black", width=2)
        return img
    small = rng.integers(0, 256, (3, 4, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str, mode: str) -> bytes:
    img = img.quantize(32) if mode == "P" else img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def corpus(n: int, seed: int = 0) -> list[bytes]:
    """Encoded images cycling through kinds, sizes from 5 to 300 px (tall, wide, tiny), modes and formats."""
    rng = np.random.default_rng(seed)
    combos = [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("PNG", "P")]
    blobs = []
    for i in range(n):
        size = (int(rng.integers(5, 300)), int(rng.integers(5, 300)))
        fmt, mode = combos[i % len(combos)]
        blobs.append(encode(make_image(rng, KINDS[i % len(KINDS)], size), fmt, mode))
    return blobs


def reference(blob: bytes) -> str:
    with Image.open(io.BytesIO(blob)) as img:
        return str(imagehash.phash(img))


BLOBS = corpus(150)
REFERENCE = [reference(b) for b in BLOBS]


def test_phash_bytes_is_bit_identical_to_imagehash() -> None:
    hashes, errors = phash_bytes(BLOBS)
    assert errors == [None] * len(BLOBS)
    assert hashes.dtype == np.uint64 and hashes.shape == (len(BLOBS),)
    ours = [to_hex(h) for h in hashes]
    identical = np.mean([a == b for a, b in zip(ours, REFERENCE, strict=True)])
    assert identical >= 0.99, [(i, a, b) for i, (a, b) in enumerate(zip(ours, REFERENCE, strict=True)) if a != b]
    # The hashes are not trivially alike: the corpus spans many distinct values.
    assert len(set(ours)) > 100


def test_phash_images_matches_imagehash_for_every_mode() -> None:
    rng = np.random.default_rng(4)
    base = make_image(rng, "photo", (257, 131))
    images = [
        base,
        base.convert("L"),
        base.convert("RGBA"),
        base.quantize(16),
        base.convert("1"),
        base.convert("LA"),
        base.convert("CMYK"),
        base.convert("I"),
        make_image(rng, "smooth", (7, 400)),  # upscaled across, downscaled along
        make_image(rng, "noise", (1, 1)),
    ]
    ours = phash_images(images)
    assert [to_hex(h) for h in ours] == [str(imagehash.phash(img)) for img in images]
    assert phash_images([]).shape == (0,)


def test_broken_bytes_become_errors_not_exceptions() -> None:
    good = BLOBS[:2]
    truncated_jpeg = BLOBS[0][: len(BLOBS[0]) // 2]
    png_header_only = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    blobs = [good[0], b"", b"not an image at all", truncated_jpeg, png_header_only, good[1]]
    hashes, errors = phash_bytes(blobs)
    assert errors[0] is None and errors[-1] is None
    assert all(isinstance(e, str) and e for e in errors[1:-1]), errors
    assert "UnidentifiedImageError" in str(errors[1])
    assert to_hex(hashes[0]) == REFERENCE[0] and to_hex(hashes[-1]) == REFERENCE[1]
    assert (hashes[1:-1] == 0).all()


def test_hex_round_trip_matches_imagehash_strings() -> None:
    for text in REFERENCE[:40]:
        assert to_hex(from_hex(text)) == text
        assert imagehash.hex_to_hash(to_hex(from_hex(text))) == imagehash.hex_to_hash(text)
    for value in (0, 1, 0xF, 2**63, 2**64 - 1, 0x00AB00CD):
        text = to_hex(np.uint64(value))
        assert len(text) == 16 and text == text.lower() and from_hex(text) == value
    assert to_hex(1) == "0000000000000001"
    assert from_hex("FFFFFFFFFFFFFFFF") == 2**64 - 1
    for bad in ("", "123", "g" * 16, "0" * 17, "0x00000000000000"):
        with pytest.raises(ValueError):
            from_hex(bad)
    with pytest.raises(ValueError):
        to_hex(2**64)
    # imagehash's own parse of our string gives back the same bits it hashed.
    with Image.open(io.BytesIO(BLOBS[3])) as img:
        assert imagehash.hex_to_hash(to_hex(phash_images([img])[0])) == imagehash.phash(img)


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    for i, name in enumerate(("a.jpg", "b.png", "nested/c.JPEG", "nested/d.webp")):
        fmt = {".jpg": "JPEG", ".png": "PNG", ".jpeg": "JPEG", ".webp": "WEBP"}[Path(name).suffix.lower()]
        (root / name).write_bytes(encode(make_image(np.random.default_rng(i), "photo", (90, 60)), fmt, "RGB"))
    (root / "nested" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "notes.txt").write_text("not an image")
    return root


def test_write_hashes_one_row_per_file(image_dir: Path, tmp_path: Path) -> None:
    paths = [*find_images([image_dir]), str(tmp_path / "missing.png")]
    out = tmp_path / "out" / "hashes.parquet"
    write_hashes(paths, str(out))
    table = pq.read_table(out)
    assert table.column_names == [PATH, R.PHASH, R.ERROR]
    assert all(table.schema.field(c).type == pa.string() for c in table.column_names)
    rows = table.to_pylist()
    assert [r[PATH] for r in rows] == paths
    by_name = {Path(r[PATH]).name: r for r in rows}
    for name in ("a.jpg", "b.png", "c.JPEG", "d.webp"):
        row = by_name[name]
        with Image.open(row[PATH]) as img:
            assert row[R.PHASH] == str(imagehash.phash(img)) and row[R.ERROR] is None
    for name in ("broken.jpg", "missing.png"):
        assert by_name[name][R.PHASH] is None and by_name[name][R.ERROR]
    assert "FileNotFoundError" in by_name["missing.png"][R.ERROR]


def test_find_images_recurses_and_filters(image_dir: Path) -> None:
    found = [Path(p).relative_to(image_dir).as_posix() for p in find_images([image_dir])]
    assert found == ["a.jpg", "b.png", "nested/broken.jpg", "nested/c.JPEG", "nested/d.webp"]
    assert find_images([image_dir / "notes.txt"]) == [str(image_dir / "notes.txt")]  # named files are taken as given
    with pytest.raises(FileNotFoundError):
        find_images([image_dir / "nope"])


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_parallel_workers_equal_serial(tmp_path: Path, executor: str) -> None:
    paths = []
    for i, blob in enumerate(BLOBS[:40]):
        path = tmp_path / f"{i:03d}.img"
        path.write_bytes(blob)
        paths.append(path)
    paths.insert(7, tmp_path / "missing.jpg")
    config = PhashConfig(chunk_size=6, executor=executor)  # type: ignore[arg-type]
    serial, serial_errors = phash_files(paths, workers=1)
    parallel, parallel_errors = phash_files(paths, workers=2, config=config)
    np.testing.assert_array_equal(parallel, serial)
    assert parallel_errors == serial_errors
    assert [to_hex(h) for h in np.delete(serial, 7)] == REFERENCE[:40]
    assert serial_errors[7] is not None and sum(e is not None for e in serial_errors) == 1


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        PhashConfig(chunk_size=0)
    with pytest.raises(ValueError, match="executor"):
        PhashConfig(executor="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="extensions"):
        PhashConfig(extensions=("JPG",))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curation")
    add_phash_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_parser_hashes_files_and_directories(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    extra = tmp_path / "extra.png"
    extra.write_bytes(BLOBS[2])
    out = tmp_path / "cli.parquet"
    args = build_parser().parse_args(["phash", str(image_dir), str(extra), "-o", str(out), "--workers", "1"])
    assert args.command == "phash" and args.workers == 1 and args.executor == "thread"
    assert args.func(args) == 0
    table = pq.read_table(out).to_pylist()
    assert len(table) == 6  # five image-suffixed files under the folder (one broken) plus the named file
    assert table[-1][PATH] == str(extra) and table[-1][R.PHASH] == REFERENCE[2]
    assert '"errors": 1' in capsys.readouterr().out

    missing = build_parser().parse_args(["phash", str(tmp_path / "nope"), "-o", str(out)])
    assert missing.func(missing) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = build_parser().parse_args(["phash", str(empty), "-o", str(tmp_path / "none.parquet")])
    assert nothing.func(nothing) == 2 and not (tmp_path / "none.parquet").exists()
    assert build_parser().parse_args(["phash", "x", "-o", "y", "--executor", "process"]).executor == "process"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["phash", str(image_dir)])  # -o is required
    with pytest.raises(SystemExit):
        build_parser().parse_args(["phash", "x", "-o", "y", "--executor", "gpu"])
