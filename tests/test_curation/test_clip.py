"""The CLIP pass on tiny generated webdataset shards with a tiny random open_clip model, all offline."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from curation import records as R
from curation.clip import (
    ClipPassConfig,
    LoadedClip,
    ShardMismatchError,
    embed_images,
    embed_texts,
    load_clip,
    run_clip_pass,
)
from curation.phash import to_hex
from tests.test_curation.conftest import FP16_TOL


def tiny_config(name: str, **overrides: object) -> ClipPassConfig:
    base: dict[str, object] = dict(model_name=name, pretrained=None, device="cpu", precision="fp32", batch_size=3,
                                   num_workers=2, threshold_en=0.0, threshold_other=0.0, text_batch_size=4)
    base.update(overrides)
    return ClipPassConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_clip(tiny_model_name: str) -> LoadedClip:
    torch.manual_seed(0)
    return load_clip(tiny_config(tiny_model_name))


@dataclass(frozen=True)
class Partition:
    shards_dir: Path
    pairs: pa.Table
    downloads: pa.Table
    image_bytes: dict[int, bytes]  # uid -> the .jpg bytes written for it
    corrupt_uid: int
    failed_uids: tuple[int, ...]  # a downloads row, but not a success
    absent_uid: int  # no downloads row at all


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(24, 64)), int(rng.integers(24, 64))
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + rng.normal(0, 60, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_partition(root: Path, *, shards: int = 2, per_shard: int = 5, seed: int = 0) -> Partition:
    """img2dataset-shaped shards: `<key>.jpg/.txt/.json` per success, the .json carrying the uid."""
    rng = np.random.default_rng(seed)
    shards_dir = root / "shards"
    shards_dir.mkdir(parents=True)
    languages = ["en", "de", "", None, "fr", "en"]
    pair_rows: list[dict[str, object]] = []
    download_rows: list[dict[str, object]] = []
    image_bytes: dict[int, bytes] = {}
    corrupt_uid = -1
    n = 0
    for s in range(shards):
        shard = f"{s:05d}"
        members: list[tuple[str, bytes]] = []
        for i in range(per_shard):
            uid = int(rng.integers(1, 2**62))
            key = f"{s:05d}{i:04d}"
            text = f"caption number {n} of shard {s}"
            pair_rows.append({R.UID: uid, R.TEXT: text, R.LANGUAGE: languages[n % len(languages)]})
            download_rows.append({R.UID: uid, R.STATUS: R.STATUS_SUCCESS, R.SHARD: shard, R.KEY: key})
            data = jpeg(seed * 1000 + n)
            if s == 0 and i == 1:  # bytes that start like a JPEG and then stop making sense
                data, corrupt_uid = data[:40] + b"\x00garbage" * 8, uid
            else:
                image_bytes[uid] = data
            members += [(f"{key}.jpg", data), (f"{key}.txt", text.encode()),
                        (f"{key}.json", json.dumps({"uid": uid, "key": key, "caption": text}).encode())]
            n += 1
        write_tar(shards_dir / f"{shard}.tar", members)
    failed = tuple(int(rng.integers(1, 2**62)) for _ in range(2))
    for uid in failed:
        pair_rows.append({R.UID: uid, R.TEXT: "never fetched", R.LANGUAGE: "en"})
        download_rows.append({R.UID: uid, R.STATUS: R.STATUS_FAILED_DOWNLOAD, R.SHARD: "00000", R.KEY: None})
    absent = int(rng.integers(1, 2**62))
    pair_rows.append({R.UID: absent, R.TEXT: "no download row", R.LANGUAGE: "de"})
    order = rng.permutation(len(pair_rows))  # pairs order is unrelated to shard order
    pairs = pa.Table.from_pylist([pair_rows[i] for i in order], schema=pa.schema(
        [(R.UID, pa.int64()), (R.TEXT, pa.string()), (R.LANGUAGE, pa.string())]))
    downloads = pa.Table.from_pylist(download_rows[::-1], schema=pa.schema(
        [(R.UID, pa.int64()), (R.STATUS, pa.string()), (R.SHARD, pa.string()), (R.KEY, pa.string())]))
    return Partition(shards_dir, pairs, downloads, image_bytes, corrupt_uid, failed, absent)


@pytest.fixture
def partition(tmp_path: Path) -> Partition:
    return make_partition(tmp_path)


def load_npy(out_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.load(out_dir / "img_emb.npy"), np.load(out_dir / "text_emb.npy"), np.load(out_dir / "uids.npy")


def rows_by_uid(table: pa.Table) -> dict[int, dict[str, object]]:
    return {row[R.UID]: row for row in table.to_pylist()}


# 0: decode in the main process; 2: two shards, one per worker; 3: more workers than shards (sample split).
@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core runner is deliberate
def test_embeddings_align_with_uids(partition: Partition, tiny_clip: LoadedClip, tiny_model_name: str,
                                    tmp_path: Path, workers: int) -> None:
    out = tmp_path / "emb"
    result = run_clip_pass(str(partition.shards_dir), partition.pairs, partition.downloads, str(out),
                           tiny_config(tiny_model_name, num_workers=workers), clip=tiny_clip)
    img_emb, text_emb, uids = load_npy(out)
    assert uids.dtype == np.int64 and sorted(uids.tolist()) == sorted(partition.image_bytes)
    assert img_emb.dtype == np.float16 and text_emb.dtype == np.float16
    assert img_emb.shape == text_emb.shape == (len(uids), 32)
    np.testing.assert_allclose(np.linalg.norm(img_emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(text_emb.astype(np.float32), axis=1), 1.0, atol=2e-3)

    images = [Image.open(io.BytesIO(partition.image_bytes[u])) for u in uids.tolist()]
    direct = embed_images(tiny_clip.model, tiny_clip.preprocess, images)
    np.testing.assert_allclose(img_emb.astype(np.float32), direct, atol=FP16_TOL)
    # The check above could only pass by accident if different images embedded alike.
    gaps = np.abs(direct[:, None, :] - direct[None, :, :]).max(axis=2) + np.eye(len(direct))
    assert gaps.min() > 5 * FP16_TOL

    captions = dict(zip(partition.pairs.column(R.UID).to_pylist(), partition.pairs.column(R.TEXT).to_pylist(),
                        strict=True))
    direct_text = embed_texts(tiny_clip.model, tiny_clip.tokenizer, [captions[u] for u in uids.tolist()])
    np.testing.assert_allclose(text_emb.astype(np.float32), direct_text, atol=FP16_TOL)

    # Files follow pairs order, whatever order the workers delivered in.
    pair_order = [u for u in partition.pairs.column(R.UID).to_pylist() if u in partition.image_bytes]
    assert uids.tolist() == pair_order
    assert result.n_embedded == len(uids)


def test_one_row_per_pair_with_statuses(partition: Partition, tiny_clip: LoadedClip, tiny_model_name: str,
                                        tmp_path: Path) -> None:
    out = tmp_path / "emb"
    result = run_clip_pass(str(partition.shards_dir), partition.pairs, partition.downloads, str(out),
                           tiny_config(tiny_model_name), clip=tiny_clip)
    table = result.table
    assert table.column(R.UID).to_pylist() == partition.pairs.column(R.UID).to_pylist()
    assert table.schema.field(R.SIMILARITY).type == pa.float32()
    assert table.schema.field(R.LANGUAGE_THRESHOLD).type == pa.float32()
    rows = rows_by_uid(table)

    bad = rows[partition.corrupt_uid]
    assert (bad[R.STATUS], bad[R.REASON], bad[R.KEEP], bad[R.SIMILARITY]) == (
        R.STATUS_FAILED_DECODE, R.STATUS_FAILED_DECODE, False, None)
    assert bad[R.ERROR]
    _, _, uids = load_npy(out)
    assert partition.corrupt_uid not in uids.tolist()

    for uid in (*partition.failed_uids, partition.absent_uid):
        row = rows[uid]
        assert (row[R.STATUS], row[R.REASON], row[R.KEEP], row[R.SIMILARITY]) == (
            R.STATUS_NOT_DOWNLOADED, R.STATUS_NOT_DOWNLOADED, False, None)
    assert rows[partition.failed_uids[0]][R.ERROR] == R.STATUS_FAILED_DOWNLOAD

    ok = len(partition.image_bytes)
    assert result.counts_by_status == {R.STATUS_OK: ok, R.STATUS_FAILED_DECODE: 1, R.STATUS_NOT_DOWNLOADED: 3}
    assert result.n_embedded == ok and result.embed_dim == 32
    assert result.precision == "fp32" and result.device == "cpu"
    assert result.images_per_s > 0 and result.seconds_decode_wait >= 0 and result.seconds_model > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_phash_of_each_embedded_image_is_imagehash_of_its_stored_bytes(
        partition: Partition, tiny_clip: LoadedClip, tiny_model_name: str, tmp_path: Path, workers: int) -> None:
    """The pass hashes the image it decodes (no second decode): imagehash.phash of the shard bytes, per uid."""
    result = run_clip_pass(str(partition.shards_dir), partition.pairs, partition.downloads, str(tmp_path / "emb"),
                           tiny_config(tiny_model_name, num_workers=workers), clip=tiny_clip)
    rows = rows_by_uid(result.table)
    for uid, data in partition.image_bytes.items():
        expected = str(imagehash.phash(Image.open(io.BytesIO(data))))
        assert to_hex(rows[uid][R.PHASH]) == expected
    assert rows[partition.corrupt_uid][R.PHASH] is None
    assert all(rows[u][R.PHASH] is None for u in partition.failed_uids)


def test_similarity_is_the_dot_product_of_stored_embeddings(partition: Partition, tiny_clip: LoadedClip,
                                                            tiny_model_name: str, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    result = run_clip_pass(str(partition.shards_dir), partition.pairs, partition.downloads, str(out),
                           tiny_config(tiny_model_name), clip=tiny_clip)
    img_emb, text_emb, uids = load_npy(out)
    stored = np.einsum("nd,nd->n", img_emb.astype(np.float32), text_emb.astype(np.float32))
    rows = rows_by_uid(result.table)
    sims = np.array([rows[u][R.SIMILARITY] for u in uids.tolist()], dtype=np.float32)
    np.testing.assert_allclose(sims, stored, atol=FP16_TOL)
    assert np.ptp(sims) > 10 * FP16_TOL  # distinct scores, so a shuffled column would be caught


def test_language_aware_thresholds(partition: Partition, tiny_clip: LoadedClip, tiny_model_name: str,
                                   tmp_path: Path) -> None:
    # Impossible bar for English, none for every other language (empty and null included).
    config = tiny_config(tiny_model_name, threshold_en=1.0, threshold_other=-1.0)
    result = run_clip_pass(str(partition.shards_dir), partition.pairs, partition.downloads, str(tmp_path / "a"),
                           config, clip=tiny_clip)
    languages = dict(zip(partition.pairs.column(R.UID).to_pylist(), partition.pairs.column(R.LANGUAGE).to_pylist(),
                         strict=True))
    ok_rows = [r for r in result.table.to_pylist() if r[R.STATUS] == R.STATUS_OK]
    assert {languages[r[R.UID]] for r in ok_rows} == {"en", "de", "fr", "", None}
    for row in ok_rows:
        en = languages[row[R.UID]] == "en"
        assert row[R.KEEP] is (not en)
        assert row[R.REASON] == (R.DROP_LOW_SIMILARITY if en else None)
        assert row[R.LANGUAGE_THRESHOLD] == pytest.approx(1.0 if en else -1.0)

    # A threshold inside the score range splits each group exactly at the bar.
    sims = sorted(r[R.SIMILARITY] for r in ok_rows)
    mid = float(sims[len(sims) // 2])
    config = tiny_config(tiny_model_name, threshold_en=mid, threshold_other=float(sims[0]) - 0.01)
    result = run_clip_pass(str(partition.shards_dir), partition.pairs, partition.downloads, str(tmp_path / "b"),
                           config, clip=tiny_clip)
    for row in result.table.to_pylist():
        if row[R.STATUS] != R.STATUS_OK:
            continue
        bar = mid if languages[row[R.UID]] == "en" else float(sims[0]) - 0.01
        assert row[R.KEEP] is bool(np.float32(row[R.SIMILARITY]) >= np.float32(bar))
    assert result.n_kept == sum(r[R.KEEP] for r in result.table.to_pylist())


def test_shards_that_disagree_with_downloads_raise(tmp_path: Path, tiny_clip: LoadedClip,
                                                   tiny_model_name: str) -> None:
    part = make_partition(tmp_path, shards=1, per_shard=3)
    uids = part.downloads.column(R.UID).to_pylist()
    shuffled = part.downloads.set_column(0, R.UID, pa.array(uids[1:] + uids[:1], pa.int64()))  # keys -> wrong uids
    with pytest.raises(ShardMismatchError, match="not this downloads table's"):
        run_clip_pass(str(part.shards_dir), part.pairs, shuffled, str(tmp_path / "out"),
                      tiny_config(tiny_model_name, num_workers=0), clip=tiny_clip)
    (part.shards_dir / "00000.tar").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        run_clip_pass(str(part.shards_dir), part.pairs, part.downloads, str(tmp_path / "out"),
                      tiny_config(tiny_model_name, num_workers=0), clip=tiny_clip)


def test_nothing_downloaded_writes_empty_files(tmp_path: Path, tiny_clip: LoadedClip, tiny_model_name: str) -> None:
    (tmp_path / "shards").mkdir()
    pairs = pa.table({R.UID: pa.array([5, 6], pa.int64()), R.TEXT: ["a", "b"], R.LANGUAGE: ["en", "de"]})
    downloads = pa.table({R.UID: pa.array([5, 6], pa.int64()), R.STATUS: [R.STATUS_FAILED_DOWNLOAD] * 2,
                          R.SHARD: ["00000"] * 2, R.KEY: [None, None]})
    result = run_clip_pass(str(tmp_path / "shards"), pairs, downloads, str(tmp_path / "out"),
                           tiny_config(tiny_model_name), clip=tiny_clip)
    img_emb, text_emb, uids = load_npy(tmp_path / "out")
    assert img_emb.shape == text_emb.shape == (0, 32) and uids.shape == (0,)
    assert result.counts_by_status == {R.STATUS_NOT_DOWNLOADED: 2}


# --- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    dict(precision="fp8"), dict(batch_size=0), dict(text_batch_size=0), dict(num_workers=-1),
    dict(threshold_en=1.5), dict(threshold_other=-2.0), dict(device="gpu0"), dict(model_name=""),
    dict(pretrained=" "), dict(prefetch_factor=0),
])
def test_config_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ClipPassConfig(**bad)  # type: ignore[arg-type]


def test_config_resolves_device_precision_and_thresholds() -> None:
    config = ClipPassConfig(device="cpu", precision="bf16", threshold_en=0.3, threshold_other=0.2)
    assert config.resolve_device() == torch.device("cpu")
    assert config.resolve_precision(torch.device("cpu")) == "fp32"
    assert config.resolve_precision(torch.device("cuda")) == "bf16"
    assert [config.threshold_for(lang) for lang in ("en", "de", "", None)] == [0.3, 0.2, 0.2, 0.2]
    assert ClipPassConfig().threshold_en == 0.28 and ClipPassConfig().threshold_other == 0.26
    with pytest.raises(AttributeError):
        config.batch_size = 3  # type: ignore[misc]


def test_fp16_on_cpu_runs_fp32_and_says_so(tiny_model_name: str) -> None:
    with pytest.warns(RuntimeWarning, match="fp16 needs CUDA"):
        clip = load_clip(tiny_config(tiny_model_name, precision="fp16"))
    assert clip.precision == "fp32"


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
