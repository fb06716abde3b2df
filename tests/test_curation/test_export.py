"""Search results exported as img2dataset input: the file format on its own (curation.export), then `POST /export`
on a real server over the fixture web's lake, read back by pyarrow and by img2dataset's own reader."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from img2dataset.reader import Reader

from curation.export import EXPORT_SCHEMA, export_results, results_table
from curation.service import ServiceConfig
from tests.servers import Server

TOKEN = "test-token-0123456789abcdef"
QUERY = {"text": "a drawing of a red circle", "modality": "image", "num_images": 30, "use_safety_model": True,
         "deduplicate": True, "min_aesthetic": 3}


def _result(uid: int, **fields: Any) -> dict[str, Any]:
    return {"id": uid, "uid": uid, "similarity": 0.5, "url": f"http://x/{uid}.jpg", "caption": f"c{uid}",
            "aesthetic": 5.0, "punsafe": 0.1, "pwatermark": 0.2, "caption_similarity": 0.3, "nsfw_tag": "UNLIKELY",
            "language": "en", "original_width": 640, "original_height": 480, "width": 256, "height": 256,
            "sha256": "ab" * 32, "crawl": "CC", "segment": "000", **fields}


def test_export_is_img2datasets_input_with_scores() -> None:
    results = [_result(2**62 + 1), _result(7, punsafe=math.nan, caption=None), {"id": 9, "similarity": 0.1}]
    exported = export_results(results, "parquet", stem="curation-results")
    table = pq.read_table(io.BytesIO(exported.data))
    assert table.schema == EXPORT_SCHEMA and table.column_names[:2] == ["url", "caption"]
    assert exported.filename == "curation-results.parquet" and exported.rows == 2  # the id-only tail is left out
    assert table.column("uid").to_pylist() == [2**62 + 1, 7]  # int64 uids exact
    assert table.column("punsafe").to_pylist() == [pytest.approx(0.1), None]  # NaN: null, not a fake score
    as_json = json.loads(export_results(results, "json").data)
    assert as_json == table.to_pylist()
    assert results_table([]).schema == EXPORT_SCHEMA  # no results: an empty file that still reads
    with pytest.raises(ValueError, match="format must be one of"):
        export_results(results, "csv")


@pytest.fixture(scope="module")
def server(indexed_lake: Path, sample_models: dict[str, Any]) -> Iterator[Server]:
    config = ServiceConfig(lake_root=str(indexed_lake), spec=sample_models, device="cpu", rate_per_s=1000,
                           burst=1000, token=TOKEN)
    with Server(config) as s:
        yield s


def _post(server: Server, path: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    return server.call(path, body, headers={"Authorization": f"Bearer {TOKEN}"})


def _img2dataset_rows(path: Path, fmt: str, tmp_path: Path) -> list[dict[str, Any]]:
    """What img2dataset would download: its Reader's shards of the file (url, caption and the uid kept)."""
    work = tmp_path / f"reader-{fmt}"
    work.mkdir()
    reader = Reader(str(path), fmt, "url", "caption", None, None, ["uid"], 1000, set(), str(work))
    rows: list[dict[str, Any]] = []
    for _, shard in reader:
        with pa.memory_map(shard) as source:
            rows += pa.ipc.open_file(source).read_all().to_pylist()
    return rows


def test_export_returns_the_search_results_as_a_file(server: Server, tmp_path: Path) -> None:
    status, results, _ = _post(server, "/knn-service", QUERY)
    assert status == 200 and len(results) >= 10
    status, data, headers = _post(server, "/export", {**QUERY, "format": "parquet", "num_result_ids": 100})
    assert status == 200 and headers["content-type"] == "application/vnd.apache.parquet"
    assert headers["content-disposition"] == 'attachment; filename="curation-results.parquet"'
    table = pq.read_table(io.BytesIO(data))
    assert table.column("uid").to_pylist() == [r["id"] for r in results]  # the same rows, in the same order
    assert table.column("url").to_pylist() == [r["url"] for r in results]
    assert table.column("query_similarity").to_pylist() == pytest.approx([r["similarity"] for r in results])
    assert table.column("similarity").to_pylist() == pytest.approx([r["caption_similarity"] for r in results])
    assert min(table.column("aesthetic").to_pylist()) >= 3  # the filters applied
    parquet = tmp_path / "results.parquet"
    parquet.write_bytes(data)
    read = _img2dataset_rows(parquet, "parquet", tmp_path)
    assert [(r["url"], r["caption"], r["uid"]) for r in read] == [(r["url"], r["caption"], r["id"]) for r in results]

    status, rows, headers = _post(server, "/export", {**QUERY, "format": "json"})
    assert status == 200 and headers["content-disposition"] == 'attachment; filename="curation-results.json"'
    assert rows == table.to_pylist()
    as_json = tmp_path / "results.json"
    as_json.write_bytes(json.dumps(rows).encode())
    assert [r["url"] for r in _img2dataset_rows(as_json, "json", tmp_path)] == [r["url"] for r in results]


def test_export_refuses_what_a_search_refuses(server: Server) -> None:
    for body, reason in (({**QUERY}, "format must be one of"), ({**QUERY, "format": "csv"}, "format must be one of"),
                         ({"format": "json"}, "give exactly one of"),
                         ({**QUERY, "format": "json", "min_aesthetic": "high"}, "min_aesthetic must be a number")):
        status, out, _ = _post(server, "/export", body)
        assert status == 400 and reason in out["error"], (body, out)
    assert server.call("/export", {**QUERY, "format": "json"})[0] == 401  # the token guards it as every endpoint
