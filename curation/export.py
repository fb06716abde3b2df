"""Search results as a file img2dataset downloads from, so what the explorer shows can be fetched as a dataset.

`export_results(results, "parquet" | "json")` takes the service's result dicts (curation.service: `id`/`uid`,
the query's `similarity`, `url`, `caption` and every score) and returns the file: one row per result, best first,
with img2dataset's `url` and `caption` columns (`img2dataset --input_format parquet --url_col url --caption_col
caption`, or `--input_format json` for the JSON array) and beside them the uid, both similarities and the scores,
which img2dataset carries into its output with `--save_additional_columns`. `similarity` is the image-caption cosine
as in LAION's parquet and our subset releases; the query's score is `query_similarity`. The columns are fixed, so
an empty result set is still a readable file with the same schema. No export holds a taken-down uid: the service's
search never returns one (curation.search).
"""

from __future__ import annotations

import io as _io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation import records as R

QUERY_SIMILARITY = "query_similarity"  # the result's score against the query (clip-retrieval's `similarity`)
# export column -> result field where the names differ: LAION's `similarity` is the image-caption cosine
_SOURCE = {R.SIMILARITY: R.CAPTION_SIMILARITY, QUERY_SIMILARITY: R.SIMILARITY}
# (column, type) of every exported row: img2dataset's two columns first, then identity and scores.
EXPORT_SCHEMA = pa.schema([
    (R.URL, pa.string()), (R.CAPTION, pa.string()), (R.UID, pa.int64()), (QUERY_SIMILARITY, pa.float64()),
    (R.SIMILARITY, pa.float64()), (R.AESTHETIC, pa.float64()), (R.PUNSAFE, pa.float64()),
    (R.PWATERMARK, pa.float64()), (R.NSFW_TAG, pa.string()), (R.LANGUAGE, pa.string()),
    (R.ORIGINAL_WIDTH, pa.int64()), (R.ORIGINAL_HEIGHT, pa.int64()), (R.WIDTH, pa.int64()), (R.HEIGHT, pa.int64()),
    (R.SHA256, pa.string()), (R.CRAWL, pa.string()), (R.SEGMENT, pa.string()),
])
FORMATS = {"parquet": "application/vnd.apache.parquet", "json": "application/json"}


@dataclass(frozen=True)
class ExportFile:
    """An export's bytes, content type and a file name for Content-Disposition."""

    data: bytes
    media_type: str
    filename: str
    rows: int


def results_table(results: Sequence[Mapping[str, Any]]) -> pa.Table:
    """The results that carry metadata (clip-retrieval's id-only tail is skipped) as a table of EXPORT_SCHEMA."""
    rows = [{name: _plain(r.get(_SOURCE.get(name, name))) for name in EXPORT_SCHEMA.names} for r in results
            if R.URL in r]
    return pa.Table.from_pylist(rows, schema=EXPORT_SCHEMA)


def export_results(results: Sequence[Mapping[str, Any]], fmt: str, stem: str = "results") -> ExportFile:
    """The results as a `fmt` file ("parquet", or "json": an array of row objects); ValueError for another format."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    table = results_table(results)
    if fmt == "parquet":
        sink = _io.BytesIO()
        pq.write_table(table, sink)
        data = sink.getvalue()
    else:
        data = json.dumps(table.to_pylist(), ensure_ascii=False, allow_nan=False).encode()
    return ExportFile(data, FORMATS[fmt], f"{stem}.{fmt}", table.num_rows)


def _plain(value: Any) -> Any:
    """A field as the file holds it: NaN (a score no head gave) becomes null, numpy scalars Python ones."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
