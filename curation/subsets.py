"""Named subsets of the lake as declarative definitions, exported as versioned, diffed releases.

A definition is a name, named conditions (DuckDB boolean expressions over the `candidates` relation, with
`$parameters`), parameter defaults and output options. Conditions are written by whoever defines the subset
(in code or a YAML registry); values a user supplies at run time only ever arrive as bound parameters, and the
conditions run against an in-memory copy of the candidates with DuckDB's external access switched off, so an
expression cannot read or write anything else.

`candidates` holds one row per pair the CLIP filter kept, joined across pairs, downloads, clip and dedupe.

A release is `<lake>/subsets/<name>/release-NNNNNN/`: img2dataset-compatible parquet parts (`url`, `caption`
plus metadata columns), optionally a webdataset re-shard copied from the downloaded shards, and
`release.json` with the definition, parameters, counts and the diff against the previous release (uids added
and removed, each with a reason). `LATEST.json` names the current release and is written last. An export
whose rows equal the latest release's makes no new release.

A subset may instead be defined by a saved search (`SubsetDefinition.query`, a curation.saved_queries.SavedQuery:
a query embedding, the search service's filters and a similarity floor or a top-k). Its matches over the committed
index generation become the `query_matches` table of the sandboxed candidates and its one condition is
`uid IN (SELECT uid FROM query_matches)`, so it is released, diffed (`query` is the reason a uid left) and explained
like any other. Saved searches live in the lake, one JSON file per subset under `<lake>/subsets/_registry/`
(`save_subset`), and `load_registry(path, lake_root)` lists them beside the built-ins and the registry file's.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import re
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import io
from curation import records as R
from curation.blocklist import takedown_reason, taken_down_lists
from curation.layout import Lake, Partition, join
from curation.saved_queries import QueryMatches, SavedQuery, match_query
from curation.sql import KEPT_VIEW, connect_kept

NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
LATEST_FILE = "LATEST.json"
RELEASE_FILE = "release.json"
# Columns of every exported row (img2dataset reads `url` and `caption`; the rest ride along as metadata).
EXPORT_COLUMNS = ("url", "caption", "uid", "language", "original_width", "original_height", "similarity",
                  "punsafe", "pwatermark", "aesthetic", "nsfw_tag", "sha256", "crawl", "segment", "source_shard",
                  "source_key")
CANDIDATE_SQL = f"SELECT k.*, {{dedupe_columns}} FROM {KEPT_VIEW} k {{dedupe_join}}"
WITH_DEDUPE = ("coalesce(x.survivor, false) AS survivor, x.cluster_id, x.reason AS dedupe_reason",
               "LEFT JOIN dedupe x USING (uid, crawl, segment)")
WITHOUT_DEDUPE = ("false AS survivor, NULL::BIGINT AS cluster_id, 'not deduplicated' AS dedupe_reason", "")
QUERY_TABLE = "query_matches"  # a saved search's matches (uid, query_similarity), in the sandbox beside candidates
QUERY_CONDITION = ("query", f"uid IN (SELECT uid FROM {QUERY_TABLE})")


@dataclass(frozen=True)
class SubsetDefinition:
    """One named subset: rows of `candidates` meeting every condition (and surviving dedupe, by default)."""

    name: str
    description: str
    conditions: tuple[tuple[str, str], ...]  # (condition name, DuckDB boolean expression with $params)
    params: tuple[tuple[str, Any], ...] = ()  # parameter defaults
    survivors_only: bool = True
    parts: int = 1
    webdataset: bool = False
    shard_size: int = 10_000
    drift_max_ks: float = 0.2  # a score distribution moving further than this from the last release warns
    query: SavedQuery | None = None  # a saved search: its matches are QUERY_CONDITION's `query_matches`

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ValueError(f"subset name {self.name!r} must match {NAME.pattern}")
        if not self.conditions:
            raise ValueError(f"subset {self.name}: needs at least one condition")
        if self.query is not None and QUERY_CONDITION not in self.conditions:
            raise ValueError(f"subset {self.name}: a saved search needs the condition {QUERY_CONDITION}")
        names = [n for n, _ in self.conditions]
        if len(set(names)) != len(names) or not all(NAME.match(n) for n in names):
            raise ValueError(f"subset {self.name}: condition names must be unique identifiers, got {names}")
        declared = {k for k, _ in self.params}
        with duckdb.connect() as parser:
            for cname, expr in self.conditions:
                if ";" in expr:
                    raise ValueError(f"subset {self.name}: condition {cname} must be one expression (no ';')")
                problem = _expression_problem(parser, expr)
                if problem:
                    raise ValueError(f"subset {self.name}: condition {cname} must be one standalone expression, "
                                     f"got {expr!r}: {problem}")
                unknown = set(PARAM.findall(expr)) - declared
                if unknown:
                    raise ValueError(f"subset {self.name}: condition {cname} uses undeclared parameters "
                                     f"{sorted(unknown)}")
        if self.parts < 1 or self.shard_size < 1:
            raise ValueError(f"subset {self.name}: parts and shard_size must be >= 1")
        if not 0.0 < self.drift_max_ks <= 1.0:
            raise ValueError(f"subset {self.name}: drift_max_ks must be in (0, 1]")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SubsetDefinition:
        """Build from a registry entry: name, description, conditions {name: expr}, params {name: value},
        survivors_only, parts, webdataset, shard_size, drift_max_ks, and `query` (a SavedQuery record: the
        subset is that saved search, narrowed by any other conditions)."""
        known = {"name", "description", "conditions", "params", "survivors_only", "parts", "webdataset",
                 "shard_size", "drift_max_ks", "query"}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"subset {data.get('name')!r}: unknown keys {extra}; known: {sorted(known)}")
        conditions = data.get("conditions") or {}
        if not isinstance(conditions, Mapping):
            raise ValueError(f"subset {data.get('name')!r}: conditions must map names to expressions")
        query = None
        if data.get("query") is not None:
            try:
                query = SavedQuery.from_mapping(data["query"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"subset {data.get('name')!r}: {exc}") from None
            conditions = {QUERY_CONDITION[0]: QUERY_CONDITION[1], **conditions}
        return cls(name=str(data.get("name", "")), description=str(data.get("description", "")),
                   conditions=tuple((str(k), str(v)) for k, v in conditions.items()),
                   params=tuple((str(k), v) for k, v in (data.get("params") or {}).items()),
                   survivors_only=bool(data.get("survivors_only", True)), parts=int(data.get("parts", 1)),
                   webdataset=bool(data.get("webdataset", False)), shard_size=int(data.get("shard_size", 10_000)),
                   drift_max_ks=float(data.get("drift_max_ks", 0.2)), query=query)

    @classmethod
    def from_query(cls, name: str, description: str, query: SavedQuery) -> SubsetDefinition:
        """A subset that is exactly a saved search (dedupe survivors only, as the index is)."""
        return cls(name=name, description=description or f"saved search: {query.describe()}",
                   conditions=(QUERY_CONDITION,), query=query)

    def resolve_params(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults with overrides applied; an override is cast to its default's type (run config gives strings)."""
        out = dict(self.params)
        for key, value in (overrides or {}).items():
            if key not in out:
                raise ValueError(f"subset {self.name} has no parameter {key!r}; it has {sorted(out)}")
            default = out[key]
            try:
                out[key] = (value if default is None or isinstance(value, type(default))
                            else _cast(value, type(default)))
            except (TypeError, ValueError) as exc:
                kind = type(default).__name__
                hint = f" (give JSON, e.g. {json.dumps(default)})" if isinstance(default, list | tuple | dict) else ""
                raise ValueError(f"subset {self.name}: parameter {key}={value!r} is not a {kind}{hint}") from exc
        return out

    def record(self) -> dict[str, Any]:
        """JSON-ready, what `from_mapping` reads back; `query` only for a saved search, so the record (and the
        release digest over it) of every other subset is what it was before saved searches existed."""
        out = {**asdict(self), "conditions": dict(self.conditions), "params": dict(self.params)}
        if self.query is None:
            out.pop("query")
        else:
            out["query"] = self.query.record()
        return out


def _cast(value: Any, kind: type) -> Any:
    """An override (a string from the command line or run config) as the type of its parameter's default.
    Lists and mappings are read as JSON: `list("abc")` would split a string into its characters."""
    if kind is bool:
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if kind in (list, tuple, dict):
        parsed = json.loads(value) if isinstance(value, str) else value
        if not isinstance(parsed, dict if kind is dict else list | tuple):
            raise ValueError(value)
        return kind(parsed)
    return kind(value)


def _expression_problem(con: duckdb.DuckDBPyConnection, expr: str) -> str | None:
    """Why a condition is not exactly one standalone expression, or None when it is.

    Conditions are spliced into SQL inside `coalesce((expr), false)`, so one that closes those parentheses
    itself (`true), true) OR (true`) would change the query around it. DuckDB parses it, without running it
    (the text is a bound parameter), as `SELECT (expr)`: a single expression gives exactly one select item
    and nothing else, so any other FROM, WHERE, set operation, ORDER BY or second item is refused.
    """
    if not expr.strip():
        return "it is empty"
    parsed = _parse_select(con, f"SELECT ({expr})")
    if parsed.get("error"):
        return f"it does not parse as one expression ({parsed.get('error_message')})"
    statements = parsed["statements"]
    node = statements[0]["node"] if len(statements) == 1 else {}
    reference = _parse_select(con, "SELECT (true)")["statements"][0]["node"]
    if len(node.get("select_list", ())) != 1 or _shape(node) != _shape(reference):
        return "it is more than one expression (does it close the parentheses it is wrapped in?)"
    return None


def _parse_select(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, Any]:
    row = con.execute("SELECT json_serialize_sql($sql)", {"sql": sql}).fetchone()
    assert row is not None
    return dict(json.loads(row[0]))


def _shape(node: dict[str, Any]) -> dict[str, Any]:
    """A parsed `SELECT (expr)` without the expression itself: what must equal `SELECT (true)`'s."""
    return {k: v for k, v in node.items() if k != "select_list"}


BUILTIN_SUBSETS: tuple[SubsetDefinition, ...] = (
    SubsetDefinition(
        name="laion_aesthetic",
        description="LAION-Aesthetics: aesthetic score at or above a threshold, likely safe, unlikely watermarked, "
                    "dedupe survivors only (LAION's v1 rule: pwatermark < 0.8, punsafe < 0.5)",
        conditions=(("aesthetic", "aesthetic >= $min_aesthetic"),
                    ("safe", "punsafe < $max_punsafe"),
                    ("no_watermark", "pwatermark < $max_pwatermark")),
        params=(("min_aesthetic", 6.0), ("max_punsafe", 0.5), ("max_pwatermark", 0.8)),
        webdataset=True,
    ),
    SubsetDefinition(
        name="laion_high_res",
        description="LAION-High-Res: originals at least 1024 pixels wide and high (LAION's rule), survivors only",
        conditions=(("high_res", "original_width >= $min_side AND original_height >= $min_side"),),
        params=(("min_side", 1024),),
    ),
)


def load_registry(path: str | None, lake_root: str | None = None) -> list[SubsetDefinition]:
    """The built-in subsets, those in a YAML or JSON registry file (a list of entries, or {subsets: [...]}; an
    entry with a built-in's name replaces it) and, given a lake, the searches saved in it (`save_subset`). A saved
    search never takes another subset's name: one that clashes (the file gained the name later) is refused."""
    defs = _registry_file(path)
    if lake_root:
        for saved in saved_definitions(lake_root):
            if saved.name in defs:
                where = Lake(lake_root).saved_subset(saved.name)
                raise ValueError(f"subset {saved.name!r} is both a saved search ({where}) and a built-in or "
                                 "registry-file subset: rename one of them")
            defs[saved.name] = saved
    return list(defs.values())


def _registry_file(path: str | None) -> dict[str, SubsetDefinition]:
    defs = {d.name: d for d in BUILTIN_SUBSETS}
    if path:
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        entries = data.get("subsets", []) if isinstance(data, Mapping) else data
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a list of subset definitions (or a 'subsets:' list)")
        for entry in entries:
            d = SubsetDefinition.from_mapping(entry)
            defs[d.name] = d
    return defs


def saved_definitions(lake_root: str) -> list[SubsetDefinition]:
    """The saved searches of a lake, by name (a file that does not hold the subset it is named for is refused)."""
    folder = Lake(lake_root).saved_subsets_dir()
    fs, root = io.filesystem(folder)
    if not fs.exists(root):
        return []
    out = []
    for path in sorted(fs.glob(f"{root}/*.json")):
        name = path.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            defn = SubsetDefinition.from_mapping(io.read_json(join(folder, f"{name}.json")))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{join(folder, name)}.json: not a saved search ({exc}); fix or remove it") from None
        if defn.name != name or defn.query is None:
            held = "no saved search" if defn.query is None else f"subset {defn.name!r}"
            raise ValueError(f"{join(folder, name)}.json: holds {held}, not the saved search {name!r}; fix or "
                             "remove it")
        out.append(defn)
    return out


def save_subset(lake_root: str, defn: SubsetDefinition, registry: str | None = None) -> ReleaseResult:
    """Save a search (`defn.query`) as a subset of the lake and export its first release. Refused (ValueError) when
    the name is taken by a registered subset or by an earlier subset's releases; the definition is removed again
    when the first export fails."""
    if defn.query is None:
        raise ValueError(f"subset {defn.name}: only saved searches are saved in the lake; add SQL subsets to the "
                         "registry file")
    taken = {d.name for d in load_registry(registry, lake_root)}
    if defn.name in taken:
        raise ValueError(f"a subset named {defn.name!r} already exists; choose another name")
    if io.exists(join(subset_dir(lake_root, defn.name), LATEST_FILE)):
        raise ValueError(f"{subset_dir(lake_root, defn.name)} already holds releases of an earlier subset named "
                         f"{defn.name!r}; choose another name")
    path = Lake(lake_root).saved_subset(defn.name)
    io.write_json(defn.record(), path)
    try:
        return export_subset(lake_root, defn)
    except Exception:
        io.remove(path)
        raise


def subset_summaries(lake_root: str, registry: str | None = None) -> list[dict[str, Any]]:
    """Every registered subset (built-in, registry file, saved in the lake) with its latest release, for listings."""
    out = []
    for d in load_registry(registry, lake_root):
        latest = latest_release(lake_root, d.name)
        entry: dict[str, Any] = {
            "name": d.name, "description": d.description, "kind": "search" if d.query else "conditions",
            "conditions": dict(d.conditions), "params": dict(d.params),
            "latest": None if latest is None else {k: latest.get(k) for k in ("release", "rows", "digest",
                                                                              "previous_release", "created_unix")},
        }
        if latest is not None:
            entry["latest"]["diff"] = {k: latest["diff"][k] for k in ("added", "removed")}
        if d.query is not None:
            q = d.query.record()
            entry["query"] = {k: q[k] for k in ("modality", "min_similarity", "top_k", "filters", "source",
                                                "clip_model", "clip_checkpoint", "generation")}
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------- selection


def sandboxed_candidates(lake_root: str, matches: QueryMatches | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB holding `candidates` as a table (and a saved search's `matches` as QUERY_TABLE), with
    external access off and configuration locked."""
    con, views = connect_kept(lake_root)
    cols, joins = WITH_DEDUPE if "dedupe" in views else WITHOUT_DEDUPE
    con.execute("CREATE TABLE candidates AS " + CANDIDATE_SQL.format(dedupe_columns=cols, dedupe_join=joins))
    for view in views:
        con.execute(f'DROP VIEW "{view}"')  # fixed names: the stages' and `kept`
    if matches is not None:
        con.register("_matches", pa.table({"uid": pa.array(matches.uids, pa.int64()),
                                           "query_similarity": pa.array(matches.scores, pa.float32())}))
        con.execute(f"CREATE TABLE {QUERY_TABLE} AS SELECT * FROM _matches")
        con.unregister("_matches")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def subset_candidates(lake_root: str, defn: SubsetDefinition
                      ) -> tuple[duckdb.DuckDBPyConnection, QueryMatches | None]:
    """The sandbox `select`, `explain_missing` and the export evaluate `defn` in: with its saved search's matches over
    the committed index generation when it is one."""
    matches = match_query(lake_root, defn.query) if defn.query is not None else None
    return sandboxed_candidates(lake_root, matches), matches


def _where(defn: SubsetDefinition, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    used = {p for _, expr in defn.conditions for p in PARAM.findall(expr)}
    clause = " AND ".join(f"coalesce(({expr}), false)" for _, expr in defn.conditions)
    if defn.survivors_only:
        clause = f"survivor AND {clause}"
    return clause, {k: v for k, v in params.items() if k in used}


def select(con: duckdb.DuckDBPyConnection, defn: SubsetDefinition, params: Mapping[str, Any]) -> pa.Table:
    """The subset's rows (every candidates column), ordered by crawl, segment, uid."""
    clause, bound = _where(defn, params)
    try:
        return con.sql(f"SELECT * FROM candidates WHERE {clause} ORDER BY crawl, segment, uid",
                       params=bound).to_arrow_table()
    except duckdb.Error as exc:
        raise ValueError(f"subset {defn.name}: its conditions do not evaluate: {exc}") from exc


def explain_missing(con: duckdb.DuckDBPyConnection, defn: SubsetDefinition, params: Mapping[str, Any],
                    uids: Sequence[int]) -> dict[int, str]:
    """Why each uid is not in the subset: 'not_kept' (gone from the lake or dropped by the CLIP filter),
    'duplicate:<dedupe reason>', or the names of the failed conditions joined by '+'."""
    if not uids:
        return {}
    used = {p for _, expr in defn.conditions for p in PARAM.findall(expr)}
    checks = ", ".join(f"coalesce(({expr}), false)" for _, expr in defn.conditions)
    rows = con.execute(f"SELECT uid, survivor, dedupe_reason, {checks} FROM candidates "
                       "WHERE uid IN (SELECT UNNEST($uids))",
                       {"uids": [int(u) for u in uids], **{k: v for k, v in params.items() if k in used}}).fetchall()
    out = {int(u): "not_kept" for u in uids}
    for uid, survivor, dreason, *ok in rows:
        failed = [name for (name, _), good in zip(defn.conditions, ok, strict=True) if not good]
        if defn.survivors_only and not survivor:
            out[int(uid)] = f"duplicate:{dreason}"
        elif failed:
            out[int(uid)] = "+".join(failed)
        else:
            out[int(uid)] = "unchanged"
    return out


# ---------------------------------------------------------------------------------------------------- release


@dataclass
class ReleaseResult:
    """What an export did."""

    name: str
    release: int
    path: str
    rows: int
    new_release: bool
    digest: str
    added: int
    removed: int
    removed_by_reason: dict[str, int]
    added_by_reason: dict[str, int]
    previous_release: int | None
    parts: list[str]
    shards: list[str]
    params: dict[str, Any]
    counts: dict[str, Any]
    drift: dict[str, float] = field(default_factory=dict)  # KS statistic per score vs the previous release
    seconds: float = 0.0


def subset_dir(lake_root: str, name: str) -> str:
    return Lake(lake_root).subset_dir(name)


def latest_release(lake_root: str, name: str) -> dict[str, Any] | None:
    """The latest release's `release.json`, or None before the first export."""
    pointer = join(subset_dir(lake_root, name), LATEST_FILE)
    if not io.exists(pointer):
        return None
    latest = io.read_json(pointer)
    return io.read_json(join(subset_dir(lake_root, name), latest["path"], RELEASE_FILE))


def read_release(lake_root: str, name: str, release: dict[str, Any]) -> pa.Table:
    """All parquet parts of a release, concatenated in part order."""
    base = join(subset_dir(lake_root, name), release["path"])
    tables = []
    for part in release["parts"]:
        fs, p = io.filesystem(join(base, part))
        tables.append(pq.read_table(p, filesystem=fs))
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in EXPORT_COLUMNS})


def _digest(defn: SubsetDefinition, params: Mapping[str, Any], table: pa.Table) -> str:
    h = hashlib.sha256(json.dumps({"definition": defn.record(), "params": dict(params)}, sort_keys=True,
                                  default=str).encode())
    for batch in table.select(list(EXPORT_COLUMNS)).to_batches():
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()[:32]


def export_subset(lake_root: str, defn: SubsetDefinition, overrides: Mapping[str, Any] | None = None
                  ) -> ReleaseResult:
    """Evaluate a subset over the lake and publish it as a new release when its rows changed (see module doc)."""
    started = time.perf_counter()
    params = defn.resolve_params(overrides)
    con, matches = subset_candidates(lake_root, defn)
    rows = select(con, defn, params)
    digest = _digest(defn, params, rows)
    previous = latest_release(lake_root, defn.name)
    counts = _counts(con, defn, params, rows)
    if previous is not None and previous["digest"] == digest:
        return ReleaseResult(name=defn.name, release=int(previous["release"]), path=previous["path"],
                             rows=rows.num_rows, new_release=False, digest=digest, added=0, removed=0,
                             removed_by_reason={}, added_by_reason={}, previous_release=int(previous["release"]),
                             parts=list(previous["parts"]), shards=list(previous.get("shards", [])), params=params,
                             counts=counts, drift={}, seconds=time.perf_counter() - started)
    number = int(previous["release"]) + 1 if previous else 1
    rel_path = f"release-{number:06d}"
    base = join(subset_dir(lake_root, defn.name), rel_path)
    io.remove(base)  # a half-written release from an interrupted run
    prev_table = read_release(lake_root, defn.name, previous) if previous else None
    diff = _diff(con, defn, params, rows, prev_table, previous, lake_root)
    drift = _drift(rows, prev_table)
    parts = _write_parts(rows, base, defn.parts)
    shards = _write_shards(lake_root, rows, base, defn.shard_size) if defn.webdataset else []
    record = {
        "name": defn.name, "release": number, "path": rel_path, "digest": digest, "rows": rows.num_rows,
        "definition": defn.record(), "params": params, "parts": parts, "shards": shards, "counts": counts,
        "previous_release": int(previous["release"]) if previous else None, "diff": diff, "drift": drift,
        "created_unix": round(time.time(), 3),
    }
    if matches is not None:
        record["query"] = matches.summary()  # the generation it was evaluated on, its matches and their scores
    io.write_json(record, join(base, RELEASE_FILE))
    io.write_json({"release": number, "path": rel_path, "digest": digest},
                  join(subset_dir(lake_root, defn.name), LATEST_FILE))  # the commit point
    return ReleaseResult(name=defn.name, release=number, path=base, rows=rows.num_rows, new_release=True,
                         digest=digest, added=diff["added"], removed=diff["removed"],
                         removed_by_reason=diff["removed_by_reason"], added_by_reason=diff["added_by_reason"],
                         previous_release=record["previous_release"], parts=parts, shards=shards, params=params,
                         counts=counts, drift=drift, seconds=time.perf_counter() - started)


def _counts(con: duckdb.DuckDBPyConnection, defn: SubsetDefinition, params: Mapping[str, Any],
            rows: pa.Table) -> dict[str, Any]:
    """Rows in the subset, candidates, and how many candidates each condition (and dedupe) lets through."""
    used = {p for _, expr in defn.conditions for p in PARAM.findall(expr)}
    checks = ", ".join(f"count(*) FILTER (WHERE coalesce(({expr}), false))" for _, expr in defn.conditions)
    got = con.execute(f"SELECT count(*), count(*) FILTER (WHERE survivor), {checks} FROM candidates",
                      {k: v for k, v in params.items() if k in used}).fetchone()
    assert got is not None
    by_crawl = Counter(rows.column("crawl").to_pylist()) if rows.num_rows else Counter()
    return {"rows": rows.num_rows, "candidates": int(got[0]), "dedupe_survivors": int(got[1]),
            "passing": {name: int(n) for (name, _), n in zip(defn.conditions, got[2:], strict=True)},
            "by_crawl": dict(sorted(by_crawl.items()))}


def _diff(con: duckdb.DuckDBPyConnection, defn: SubsetDefinition, params: Mapping[str, Any], rows: pa.Table,
          prev: pa.Table | None, previous: dict[str, Any] | None, lake_root: str) -> dict[str, Any]:
    now = rows.column("uid").to_numpy()
    before = prev.column("uid").to_numpy() if prev is not None else np.zeros(0, np.int64)
    added = np.setdiff1d(now, before)
    removed = np.setdiff1d(before, now)
    reasons = explain_missing(con, defn, params, removed.tolist())
    for uid, name in taken_down_lists(lake_root, removed.tolist()).items():
        reasons[uid] = takedown_reason(name)  # removed by a takedown list, whatever the tables say now
    prev_parts = set()
    if prev is not None:
        prev_parts = {f"{c}|{s}" for c, s in zip(prev.column("crawl").to_pylist(), prev.column("segment").to_pylist(),
                                                 strict=True)}
    added_rows = rows.filter(pc.is_in(rows.column("uid"), value_set=pa.array(added, pa.int64())))
    added_reason = Counter(
        "first_release" if previous is None else ("new_partition" if f"{c}|{s}" not in prev_parts else "now_matches")
        for c, s in zip(added_rows.column("crawl").to_pylist(), added_rows.column("segment").to_pylist(),
                        strict=True))
    sample = sorted(reasons.items())[:50]
    return {"added": int(added.size), "removed": int(removed.size),
            "added_by_reason": dict(sorted(added_reason.items())),
            "removed_by_reason": dict(sorted(Counter(reasons.values()).items())),
            "removed_sample": [{"uid": u, "reason": r} for u, r in sample]}


DRIFT_COLUMNS = ("aesthetic", "similarity", "punsafe", "pwatermark")


def _drift(rows: pa.Table, prev: pa.Table | None) -> dict[str, float]:
    """Two-sample Kolmogorov-Smirnov statistic per score column against the previous release."""
    if prev is None or rows.num_rows == 0 or prev.num_rows == 0:
        return {}
    from scipy.stats import ks_2samp

    out = {}
    for col in DRIFT_COLUMNS:
        a = rows.column(col).drop_null().to_numpy(zero_copy_only=False)
        b = prev.column(col).drop_null().to_numpy(zero_copy_only=False)
        if a.size and b.size:
            out[col] = round(float(ks_2samp(a, b).statistic), 4)
    return out


def _write_parts(rows: pa.Table, base: str, parts: int) -> list[str]:
    table = rows.select(list(EXPORT_COLUMNS))
    names = []
    bounds = np.linspace(0, table.num_rows, parts + 1).round().astype(int)
    for i in range(parts):
        name = f"part-{i:05d}-of-{parts:05d}.parquet"
        io.write_parquet(table.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])), join(base, name))
        names.append(name)
    return names


def _source_members(lake_root: str, part: Partition, shard: str, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """The members (by extension) of the wanted keys in one downloaded shard, read in one pass."""
    fs, path = io.filesystem(join(Lake(lake_root).shards_dir(part), f"{shard}.tar"))
    out: dict[str, dict[str, bytes]] = defaultdict(dict)
    if not fs.exists(path):
        return out
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            stem, _, ext = member.name.rpartition(".")
            if stem in keys and member.isfile():
                data = tar.extractfile(member)
                if data is not None:
                    out[stem][ext] = data.read()
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, _io.BytesIO(data))


def _chunk_members(lake_root: str, chunk: Sequence[Mapping[str, Any]]) -> dict[tuple[str, ...], dict[str, bytes]]:
    wanted: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for r in chunk:
        if r["source_shard"] is not None and r["source_key"] is not None:
            wanted[(r["crawl"], r["segment"], r["source_shard"])].add(r["source_key"])
    members: dict[tuple[str, ...], dict[str, bytes]] = {}
    for (crawl, segment, shard), keys in sorted(wanted.items()):
        for key, files in _source_members(lake_root, Partition(crawl, segment), shard, keys).items():
            members[(crawl, segment, shard, key)] = files
    return members


def _write_shards(lake_root: str, rows: pa.Table, base: str, shard_size: int) -> list[str]:
    """Copy the subset's samples out of the downloaded shards into new webdataset shards (img2dataset layout:
    `NNNNN.tar` with `<key>.jpg/.txt/.json`, keys 5-digit shard + 4-digit index, plus `NNNNN.parquet`)."""
    records = rows.to_pylist()
    names = []
    written = 0
    for start in range(0, max(len(records), 1), shard_size):
        chunk = records[start:start + shard_size]
        if not chunk:
            break
        shard_no = start // shard_size
        members = _chunk_members(lake_root, chunk)  # one output shard's images in memory at a time
        index_rows = []
        buf = _io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, r in enumerate(chunk):
                files = members.get((r["crawl"], r["segment"], r["source_shard"], r["source_key"])) or {}
                image = next(((ext, files[ext]) for ext in R.IMAGE_EXTENSIONS if ext in files), None)
                if image is None:
                    continue  # the shard lost it: counted below, never silently renamed
                key = f"{shard_no:05d}{i:04d}"
                meta = {c: r[c] for c in EXPORT_COLUMNS} | {"key": key}
                _add(tar, f"{key}.{image[0]}", image[1])
                _add(tar, f"{key}.txt", (r["caption"] or "").encode())
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode())
                index_rows.append(meta)
                written += 1
        io.write_bytes(buf.getvalue(), join(base, "shards", f"{shard_no:05d}.tar"))
        listing = pa.Table.from_pylist(index_rows) if index_rows else pa.table({"key": pa.array([], pa.string())})
        io.write_parquet(listing, join(base, "shards", f"{shard_no:05d}.parquet"))
        names.append(f"shards/{shard_no:05d}.tar")
    if written != len(records):
        raise RuntimeError(f"{len(records) - written} of {len(records)} subset samples are missing from the "
                           f"downloaded shards; re-materialize downloads for their partitions")
    return names


def release_history(lake_root: str, name: str) -> list[dict[str, Any]]:
    """Every committed release of a subset (oldest first), read from their release.json files."""
    fs, root = io.filesystem(subset_dir(lake_root, name))
    out = []
    for path in sorted(fs.glob(f"{root}/release-*/{RELEASE_FILE}")):
        out.append(io.read_json(fs.unstrip_protocol(path) if not io.is_local(subset_dir(lake_root, name)) else path))
    latest = latest_release(lake_root, name)
    cutoff = int(latest["release"]) if latest else 0
    return [r for r in out if int(r["release"]) <= cutoff]
