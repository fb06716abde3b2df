"""The `curation` command: every core stage callable outside Dagster.

Subcommands that need the orchestrator (`run`) are contributed by other packages through the
`curation.commands` entry-point group, so this module never imports Dagster. An entry point only adds its
subparser; what the command needs is imported when it runs, so `curation --help` stays light.

Errors the core raises on purpose (a bad value, a missing file, an unreadable WAT) print as one line,
`curation <command>: <message>`, with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "curation.commands"


def _sample_web(args: argparse.Namespace) -> int:
    from curation.sample.web import SampleWebConfig, generate_sample_web

    cfg = SampleWebConfig(**_given(args, "seed", "pages", "segments", "port", "crawl"))
    manifest = generate_sample_web(args.out, cfg)
    print(
        f"sample web in {args.out}: crawl {manifest['crawl']}, {len(manifest['segments'])} segments, "
        f"{len(manifest['wat_files'])} WAT files, {manifest['image_links']} image links "
        f"({manifest['extractable']} extractable), {manifest['images']} images"
    )
    return 0


def _serve_sample_web(args: argparse.Namespace) -> int:
    from curation.sample.server import serve_forever

    serve_forever(args.root, args.port)
    return 0


def _sql(args: argparse.Namespace) -> int:
    import duckdb

    from curation.io import exists
    from curation.sql import connect

    if not exists(args.lake):
        return _fail(args, f"no lake at {args.lake} (the folder does not exist)")
    con, views = connect(args.lake)
    try:
        rel = con.sql(args.query)
        if rel is None:
            return 0
        if args.format == "json":
            cols = rel.columns
            for row in rel.fetchall():
                print(json.dumps(dict(zip(cols, row, strict=True)), default=str, ensure_ascii=False))
        elif args.format == "csv":
            rel.write_csv("/dev/stdout")
        else:
            rel.show(max_rows=args.max_rows, max_width=200)
    except duckdb.Error as exc:
        hint = f" (views: {', '.join(views) or 'none, no finished partitions yet'})"
        return _fail(args, _first_line(exc) + (hint if isinstance(exc, duckdb.CatalogException) else ""))
    if not views:
        print(f"no finished stage tables under {args.lake} yet", file=sys.stderr)
    return 0


def _extract(args: argparse.Namespace) -> int:
    from curation import io
    from curation.wat import ExtractConfig, extract_pairs

    result = extract_pairs(args.wat, crawl=args.crawl, segment=args.segment, config=ExtractConfig())
    io.write_parquet(result.table, str(Path(args.output).absolute()) if "://" not in args.output else args.output)
    print(json.dumps({"pairs": result.table.num_rows, "counts": result.counts}, indent=2))
    return 0


def _download(args: argparse.Namespace) -> int:
    from curation import io
    from curation.download import DownloadConfig, download_images
    from curation.layout import join
    from curation.netguard import NetPolicy

    config = DownloadConfig(processes=args.processes, **_given(args, "image_size", "resize_mode", "threads",
                                                               "user_agent_token", "respect_robots_txt",
                                                               "respect_tdm_reservation"))
    policy = NetPolicy.with_loopback() if args.allow_loopback else NetPolicy()
    result = download_images(args.pairs, args.out, config, policy)
    io.write_parquet(result.table, join(args.out, "downloads.parquet"))
    print(
        json.dumps(
            {
                "rows": result.table.num_rows,
                "by_status": result.counts_by_status,
                "by_reason": result.counts_by_reason,
                "success_rate": round(result.success_rate, 4),
                "images_per_s": round(result.images_per_s, 1),
            },
            indent=2,
        )
    )
    return 0


def _train_head(args: argparse.Namespace) -> int:
    import numpy as np

    from curation.heads import HeadTrainConfig, train_head

    config = HeadTrainConfig(kind=args.kind, **_given(args, "architecture", "epochs", "seed"))
    meta = train_head(np.load(args.embeddings), np.load(args.labels), config, args.output, clip_model=args.clip_model)
    print(json.dumps(meta, indent=2))
    return 0


def default_model_cache() -> Path:
    """Where trained sample-web models are cached: once per machine, shared by the demo and the tests."""
    return Path.home() / ".cache" / "curation" / "models"


def _train_toy_clip(args: argparse.Namespace) -> int:
    from curation.sample.models import ensure_sample_models
    from curation.sample.toy_clip import ToyClipTrainConfig

    try:
        config = ToyClipTrainConfig(**_given(args, "epochs", "seed", "corpus_pairs", "batch_size", "lr"))
    except ValueError as exc:  # a bad flag value: say which, without a traceback
        print(f"curation train-toy-clip: {exc}", file=sys.stderr)
        return 2
    spec = ensure_sample_models(args.sample_web, str(args.cache), config)
    if args.spec_out:
        from curation.io import write_json

        write_json(spec, args.spec_out)
    print(json.dumps({"pretrained": spec["pretrained"], "heads": spec["heads"],
                      "threshold_en": spec["threshold_en"], "threshold_other": spec["threshold_other"],
                      "evaluation": spec["evaluation"]}, indent=2))
    return 0


def _score(args: argparse.Namespace) -> int:
    spec = _read_spec(args.spec)  # before torch loads: a bad file is refused at once

    from curation.layout import Partition
    from curation.scoring import ScoringConfig, score_partition

    overrides = {k: v for k, v in (("device", args.device), ("batch_size", args.batch_size),
                                   ("num_workers", args.num_workers)) if v is not None}
    result = score_partition(args.lake, Partition(args.crawl, args.segment), ScoringConfig.from_spec(spec, **overrides))
    p = result.clip_pass
    print(json.dumps({"table": result.table_path, "rows": result.table.num_rows, "embedded": p.n_embedded,
                      "kept": p.n_kept, "by_reason": p.counts_by_reason, "by_nsfw_tag": result.counts_by_tag,
                      "flagged": result.n_flagged, "images_per_s": round(p.images_per_s, 1),
                      "device": p.device}, indent=2))
    return 0


def _read_spec(path: str) -> dict[str, Any]:
    """A models spec JSON file; a file that is not JSON is refused naming it and where the JSON breaks."""
    try:
        spec = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--spec {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"--spec {path} must hold a JSON object (model_name, pretrained, ...)")
    return spec


def _index_build(args: argparse.Namespace) -> int:
    from curation.index import IndexConfig, build_index, verify_index

    fields = _given(args, "modality", "flat_max_vectors", "target_recall")
    if args.memory_budget_gb is not None:
        fields["memory_budget_bytes"] = int(args.memory_budget_gb * 2**30)
    config = IndexConfig(**fields)
    r = build_index(args.lake, config, force_rebuild=args.force)
    state = "unchanged" if r.unchanged else (f"rebuilt ({r.rebuild_reason})" if r.rebuilt else "updated")
    print(f"{config.modality} index {state}: {r.factory}, {r.vectors:,} vectors of dim {r.dim}, nprobe {r.nprobe}, "
          f"recall@{r.k} {r.recall_at_k:.4f}, query p50 {r.query_ms_p50:.2f} ms / p99 {r.query_ms_p99:.2f} ms, "
          f"+{r.added:,} -{r.removed:,} in {r.build_seconds:.1f}s")
    problems = verify_index(args.lake, config.modality)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return 1 if problems else 0


def _index_search(args: argparse.Namespace) -> int:
    spec = _read_spec(args.spec)

    from curation.search import search_text

    hits = search_text(args.lake, [args.text], spec, k=args.k, modality=args.modality, device=args.device)[0]
    if args.json:
        for h in hits:
            print(json.dumps(h.as_dict(), default=str, ensure_ascii=False))
        return 0
    for rank, h in enumerate(hits, 1):
        caption = str(h.fields.get("caption") or "")[:70]
        print(f"{rank:>3} {h.score:.4f} {h.uid:>21} {caption}  {h.fields.get('url', '')}")
    return 0


def _subset_list(args: argparse.Namespace) -> int:
    from curation.subsets import latest_release, load_registry

    for d in load_registry(args.registry, args.lake):
        latest = latest_release(args.lake, d.name) if args.lake else None
        where = d.query.describe() if d.query else " AND ".join(e for _, e in d.conditions)
        release = f"release {latest['release']}: {latest['rows']:,} rows" if latest else "no release"
        print(f"{d.name}: {where} {dict(d.params)} [{release}]")
    return 0


def _subset_export(args: argparse.Namespace) -> int:
    from curation.subsets import export_subset, load_registry

    overrides = _params(args.param)
    defs = {d.name: d for d in load_registry(args.registry, args.lake)}
    if args.name not in defs:
        return _fail(args, f"no subset {args.name!r}; known: {sorted(defs)}")
    r = export_subset(args.lake, defs[args.name], overrides)
    state = "new release" if r.new_release else "unchanged"
    print(f"{r.name} release {r.release} ({state}): {r.rows:,} rows, +{r.added:,} -{r.removed:,} "
          f"{r.removed_by_reason or ''} in {r.path}")
    return 0


def _subset_save(args: argparse.Namespace) -> int:
    spec = _read_spec(args.spec) if args.spec else None
    filters = _filter_fields(args.filter)

    import numpy as np

    from curation.saved_queries import encode_query
    from curation.subsets import SubsetDefinition, save_subset

    embedding = np.load(args.embedding) if args.embedding else None
    query = encode_query(args.lake, modality=args.modality, text=args.text, image_path=args.image, embedding=embedding,
                         spec=spec, device=args.device, filters=filters, min_similarity=args.min_similarity,
                         top_k=args.top_k)
    r = save_subset(args.lake, SubsetDefinition.from_query(args.name, args.description, query), args.registry)
    print(f"{r.name}: saved; release {r.release}: {r.rows:,} rows in {r.path}")
    return 0


def _filter_fields(pairs: Sequence[str]) -> dict[str, Any]:
    """`--filter KEY=VALUE` flags as the search service's request fields: `language` and `crawl` repeat into lists,
    the two switches read as booleans, bounds stay strings (the filters parse them)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not key:
            raise ValueError(f"--filter needs KEY=VALUE, got {pair!r}")
        if key in ("language", "crawl"):
            out.setdefault(key, []).append(value)
        elif key in ("use_safety_model", "use_violence_detector"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"--filter {key} must be true or false, got {value!r}")
            out[key] = value.lower() in ("true", "1", "yes")
        else:
            out[key] = value
    return out


def _given(args: argparse.Namespace, *flags: str) -> dict[str, Any]:
    """The named flags that were given (not None), as config fields: the config dataclass holds the defaults."""
    return {flag: getattr(args, flag) for flag in flags if getattr(args, flag) is not None}


def _params(pairs: Sequence[str]) -> dict[str, str]:
    """`--param NAME=VALUE` flags as a dict (the subset casts each value to its parameter's type)."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--param needs NAME=VALUE, got {pair!r}")
        out[name.strip()] = value
    return out


_Subparsers = argparse._SubParsersAction  # what `add_subparsers` returns; argparse has no public name for it


# A flag that sets a config dataclass field defaults to None and its command passes only the flags given
# (`_given`), so the dataclass stays the single source of each default. Its help names the field, not the value:
# reading the value would import the config's module (numpy, cv2, torch, faiss) whenever the parser is built.
def build_parser() -> argparse.ArgumentParser:
    """The `curation` parser: the core's commands, then the ones contributed through ENTRY_POINT_GROUP."""
    parser = argparse.ArgumentParser(prog="curation", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sample_commands(sub)
    _add_sql_command(sub)
    _add_stage_commands(sub)
    _add_model_commands(sub)
    _add_index_commands(sub)
    _add_subset_commands(sub)
    _add_serve_command(sub)
    _add_explain_command(sub)
    _add_takedown_commands(sub)

    from curation.phash import add_phash_parser

    add_phash_parser(sub)

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()(sub)
    return parser


def _add_sample_commands(sub: _Subparsers) -> None:
    """`sample-web` and `serve-sample-web`: generate and serve the embedded sample web."""
    p = sub.add_parser("sample-web", help="generate the embedded sample web (WAT files, images, truth)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=None, help="generator seed (default: SampleWebConfig.seed)")
    p.add_argument("--pages", type=int, default=None, help="pages in the web (default: SampleWebConfig.pages)")
    p.add_argument("--segments", type=int, default=None, help="crawl segments (default: SampleWebConfig.segments)")
    p.add_argument("--port", type=int, default=None,
                   help="port baked into the image URLs (default: SampleWebConfig.port)")
    p.add_argument("--crawl", default=None, help="crawl id (default: SampleWebConfig.crawl)")
    p.set_defaults(func=_sample_web)

    p = sub.add_parser("serve-sample-web", help="serve a generated sample web on loopback")
    p.add_argument("root")
    p.add_argument("--port", type=int, default=None, help="default: the port the sample web was generated for")
    p.set_defaults(func=_serve_sample_web)


def _add_sql_command(sub: _Subparsers) -> None:
    """`sql`: query the lake's finished stage tables."""
    p = sub.add_parser("sql", help="run SQL over the lake (one DuckDB view per stage)")
    p.add_argument("lake")
    p.add_argument("query")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--max-rows", type=int, default=40)
    p.set_defaults(func=_sql)


def _add_stage_commands(sub: _Subparsers) -> None:
    """`extract` and `download`: the first two pipeline stages on plain files."""
    p = sub.add_parser("extract", help="extract image-text pairs from WAT files")
    p.add_argument("wat", nargs="+", help="WAT files: local paths or fsspec URLs")
    p.add_argument("-o", "--output", required=True, help="output parquet")
    p.add_argument("--crawl", default="", help="crawl id recorded in the crawl column")
    p.add_argument("--segment", default="", help="segment recorded in the segment column")
    p.set_defaults(func=_extract)

    p = sub.add_parser("download", help="download a pairs parquet's images into webdataset shards")
    p.add_argument("pairs", help="parquet with uid, url, text (e.g. from `curation extract`)")
    p.add_argument("out", help="output folder: shards/ and downloads.parquet")
    p.add_argument("--image-size", type=int, default=None,
                   help="image side in pixels (default: DownloadConfig.image_size)")
    p.add_argument("--resize-mode", default=None, help="img2dataset resize mode (default: DownloadConfig.resize_mode)")
    # Not DownloadConfig's 1: like the downloads asset, the command uses both cores of a laptop.
    p.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--threads", type=int, default=None, help="per process (default: DownloadConfig.threads)")
    p.add_argument("--allow-loopback", action="store_true", help="allow 127.0.0.0/8 (the sample web)")
    p.add_argument("--user-agent-token", default=None,
                   help="our product token: in User-Agent and robots.txt groups (default: DownloadConfig's)")
    p.add_argument("--no-robots-txt", dest="respect_robots_txt", action="store_const", const=False, default=None,
                   help="do not fetch or honour robots.txt (honoured by default)")
    p.add_argument("--no-tdm-reservation", dest="respect_tdm_reservation", action="store_const", const=False,
                   default=None, help="keep images served with tdm-reservation: 1 (refused by default)")
    p.set_defaults(func=_download)


def _add_model_commands(sub: _Subparsers) -> None:
    """`train-head`, `train-toy-clip` and `score`: train the models and run the CLIP pass."""
    p = sub.add_parser("train-head", help="fit a punsafe / pwatermark / aesthetic head on labelled embeddings")
    p.add_argument("--kind", required=True, choices=("punsafe", "pwatermark", "aesthetic"))
    p.add_argument("--embeddings", required=True, help=".npy of image embeddings (n x d)")
    p.add_argument("--labels", required=True, help=".npy of labels: 0/1, or 0-10 scores for aesthetic")
    p.add_argument("--clip-model", required=True, help="the CLIP model the embeddings come from (recorded)")
    p.add_argument("--architecture", default=None, help="aesthetic: linear (v1, default) or mlp_v2")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: HeadTrainConfig.epochs)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: HeadTrainConfig.seed)")
    p.add_argument("-o", "--output", required=True, help="checkpoint path (a .json sidecar is written beside it)")
    p.set_defaults(func=_train_head)

    p = sub.add_parser("train-toy-clip", help="train (or reuse) the sample web's toy CLIP and its heads")
    p.add_argument("sample_web", help="a folder made by `curation sample-web` (its truth.parquet labels the data)")
    p.add_argument("--cache", type=Path, default=default_model_cache(),
                   help="checkpoint cache, keyed by content (default ~/.cache/curation/models)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--corpus-pairs", type=int, default=None,
                   help="fresh generated pairs added to the web's train split (0: the web alone)")
    p.add_argument("--batch-size", type=int, default=None, help="contrastive batch size")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (cosine schedule)")
    p.add_argument("--spec-out", default=None, help="also write the models spec JSON here")
    p.set_defaults(func=_train_toy_clip)

    p = sub.add_parser("score", help="run the CLIP pass for one lake partition (what the clip asset runs)")
    p.add_argument("lake")
    p.add_argument("--crawl", required=True)
    p.add_argument("--segment", required=True)
    p.add_argument("--spec", required=True, help="models spec JSON (e.g. from train-toy-clip --spec-out)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.set_defaults(func=_score)


def _add_index_commands(sub: _Subparsers) -> None:
    """`index build` and `index search`: the faiss index over the kept, deduplicated embeddings."""
    p = sub.add_parser("index", help="build or search the faiss index over kept, deduplicated embeddings")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="build or update <lake>/index/<modality> from the dedupe survivors")
    b.add_argument("lake")
    b.add_argument("--modality", choices=("image", "text"), default=None,
                   help="which embeddings to index (default: IndexConfig.modality)")
    b.add_argument("--memory-budget-gb", type=float, default=None,
                   help="in GiB (default: IndexConfig.memory_budget_bytes)")
    b.add_argument("--flat-max-vectors", type=int, default=None,
                   help="exact search up to this many vectors (default: IndexConfig.flat_max_vectors)")
    b.add_argument("--target-recall", type=float, default=None,
                   help="recall the index is tuned for (default: IndexConfig.target_recall)")
    b.add_argument("--force", action="store_true", help="retrain from scratch")
    b.set_defaults(func=_index_build)
    q = isub.add_parser("search", help="text-to-image search: top-k hits with uid, url, caption, score")
    q.add_argument("lake")
    q.add_argument("--text", required=True)
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--spec", required=True, help="the models spec the clip asset scored with")
    q.add_argument("--modality", choices=("image", "text"), default="image", help="which index to search")
    q.add_argument("--device", default="auto")
    q.add_argument("--json", action="store_true", help="one JSON object per hit")
    q.set_defaults(func=_index_search)


def _add_subset_commands(sub: _Subparsers) -> None:
    """`subset list` and `subset export`: the registered subsets and their releases."""
    p = sub.add_parser("subset", help="list or export named subsets (laion_aesthetic, laion_high_res, yours)")
    ssub = p.add_subparsers(dest="subset_command", required=True)
    s = ssub.add_parser("list", help="the registered subsets and their latest releases")
    s.add_argument("lake", nargs="?", default=None)
    s.add_argument("--registry", default=None, help="YAML/JSON file with more subset definitions")
    s.set_defaults(func=_subset_list)
    s = ssub.add_parser("export", help="evaluate a subset and publish a release when its rows changed")
    s.add_argument("lake")
    s.add_argument("name")
    s.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="override a parameter")
    s.add_argument("--registry", default=None, help="YAML/JSON file with more subset definitions")
    s.set_defaults(func=_subset_export)
    _add_subset_save_command(ssub)


def _add_subset_save_command(ssub: _Subparsers) -> None:
    """`subset save`: a search saved as a subset of the lake (curation.saved_queries)."""
    s = ssub.add_parser("save", help="save a search (a query, filters, a similarity floor or a top-k) as a subset "
                                     "of the lake and export its first release")
    s.add_argument("lake")
    s.add_argument("name", help="the subset's name: lowercase letters, digits and _, not a registered subset's")
    query = s.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query, encoded by --spec's text tower")
    query.add_argument("--image", help="an image file as the query, encoded by --spec's image tower")
    query.add_argument("--embedding", help=".npy holding one query vector of the index's model")
    selection = s.add_mutually_exclusive_group(required=True)
    selection.add_argument("--min-similarity", type=float, default=None,
                           help="every indexed image whose cosine to the query is at least this (exact)")
    selection.add_argument("--top-k", type=int, default=None, help="the k indexed images most similar to the query")
    s.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="a search-service filter: min_/max_ aesthetic, punsafe, pwatermark, similarity (the stored "
                        "image-caption cosine), original_width, original_height; language and crawl (repeat for "
                        "several); subset; use_safety_model, use_violence_detector (true/false)")
    s.add_argument("--spec", default=None, help="the models spec the clip asset scored with (for --text, --image)")
    s.add_argument("--modality", choices=("image", "text"), default="image", help="which index to search")
    s.add_argument("--description", default="", help="what the subset is for (default: the query, described)")
    s.add_argument("--device", default="auto", help="where the query tower runs")
    s.add_argument("--registry", default=None, help="YAML/JSON file whose subset names a saved search may not take")
    s.set_defaults(func=_subset_save)


def _add_serve_command(sub: _Subparsers) -> None:
    """`serve`: the search service (clip-retrieval's API) over the lake's index."""
    p = sub.add_parser("serve", help="serve the index as a KNN API clip-retrieval's clients use (curation.service)")
    p.add_argument("lake")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback; any other needs CURATION_SERVE_TOKEN)")
    p.add_argument("--port", type=int, default=1234)
    p.add_argument("--spec", default=None, help="models spec whose towers encode text and image queries")
    p.add_argument("--name", default="curation", help="the index name clients pass as indice_name")
    p.add_argument("--device", default="auto", help="where the query towers run")
    p.add_argument("--rate-limit", type=float, default=None, help="requests/s per client (default: ServiceConfig)")
    p.add_argument("--burst", type=int, default=None,
                   help="requests a client may send at once (default: ServiceConfig)")
    p.add_argument("--allow-loopback", action="store_true",
                   help="let image_url queries reach 127.0.0.0/8 (the sample web); off by default")
    p.add_argument("--registry", default=None,
                   help="subsets registry file, whose names POST /subsets may not take (default: CURATION_SUBSETS)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    # The CLI is this package's edge, as resources/settings is Dagster's: the token is read here, never logged.
    token = os.environ.get("CURATION_SERVE_TOKEN", "").strip() or None
    spec = _read_spec(args.spec) if args.spec else None

    from curation.netguard import NetPolicy
    from curation.service import ServiceConfig, serve

    overrides = {k: v for k, v in (("rate_per_s", args.rate_limit), ("burst", args.burst)) if v is not None}
    registry = args.registry or os.environ.get("CURATION_SUBSETS") or None
    config = ServiceConfig(lake_root=args.lake, name=args.name, spec=spec, device=args.device, token=token,
                           url_policy=NetPolicy.with_loopback() if args.allow_loopback else NetPolicy(),
                           subsets_registry=registry, **overrides)
    print(f"curation serve: {args.lake} on http://{args.host}:{args.port} (index {args.name!r})", file=sys.stderr)
    serve(config, args.host, args.port)
    return 0


def _add_explain_command(sub: _Subparsers) -> None:
    """`explain`: why a sample is in the curated set, or where and why it was dropped (curation.explain)."""
    p = sub.add_parser("explain", help="everything the lake knows about one sample (by uid or image URL), as JSON")
    p.add_argument("lake")
    p.add_argument("sample", metavar="UID|URL", help="a uid (int64) or an image URL; a URL may match several uids")
    p.add_argument("--subsets", default=None, metavar="REGISTRY",
                   help="YAML/JSON file with more subset definitions (besides the built-ins and the lake's saved ones)")
    p.set_defaults(func=_explain)


def _explain(args: argparse.Namespace) -> int:
    from curation.explain import NotInLake, explain, parse_sample

    try:
        result = explain(args.lake, parse_sample(args.sample), args.subsets)
    except NotInLake as exc:
        return _fail(args, str(exc))
    print(json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False))
    return 0


def _add_takedown_commands(sub: _Subparsers) -> None:
    """`takedown add|propagate|report`: takedown lists and where their removals reached (curation.takedowns)."""
    p = sub.add_parser("takedown", help="ingest takedown lists, propagate removals, report (curation.takedowns)")
    tsub = p.add_subparsers(dest="takedown_command", required=True)
    t = tsub.add_parser("add", help="ingest a list: match the lake at once (search stops returning the hits), then "
                                    "remove them everywhere")
    t.add_argument("lake")
    t.add_argument("file", help="CSV (kind,value[,radius,min_punsafe]), JSON lines, or text: `kind value` per line")
    t.add_argument("--list", required=True, dest="list_name", help="the list's name (in reasons: takedown:<name>)")
    t.add_argument("--reason", default=None, help="why (required unless the file has a `# reason:` line)")
    t.add_argument("--kind", default=None,
                   help="the kind of every line of a text file that holds values only (e.g. image_md5)")
    t.add_argument("--registry", default=None, help="subsets registry whose releases to update (default: "
                                                     "CURATION_SUBSETS; the built-ins and saved searches always)")
    t.add_argument("--no-propagate", action="store_true",
                   help="only ingest and match (the takedowns asset propagates later)")
    t.set_defaults(func=_takedown_add)
    t = tsub.add_parser("propagate", help="remove every taken-down sample from tables, shards, index and releases")
    t.add_argument("lake")
    t.add_argument("--registry", default=None, help="subsets registry (default: CURATION_SUBSETS)")
    t.set_defaults(func=_takedown_propagate)
    t = tsub.add_parser("report", help="every list: entries, matches per kind, propagation and its time")
    t.add_argument("lake")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_takedown_report)


def _takedown_add(args: argparse.Namespace) -> int:
    from curation.takedowns import ingest

    data = Path(args.file).read_bytes()
    result = ingest(args.lake, data, name=args.list_name, reason=args.reason, source=Path(args.file).name,
                    default_kind=args.kind)
    rec = result.record
    state = "ingested" if result.new else "already ingested (same content), matched again"
    print(f"{rec.name}: {state}: {rec.entries:,} entries {rec.by_kind}; {sum(result.matched.values()):,} rows "
          f"matched {result.matched} in {result.match_seconds:.2f} s")
    if args.no_propagate:
        return 0
    return _takedown_propagate(args)


def _takedown_propagate(args: argparse.Namespace) -> int:
    from curation.takedowns import propagate

    registry = args.registry or os.environ.get("CURATION_SUBSETS") or None
    r = propagate(args.lake, registry)
    s = r.scrub
    print(f"propagated in {r.seconds:.2f} s: {r.taken_down:,} rows taken down; emptied {dict(s.rows)} in "
          f"{len(s.partitions)} partitions, {s.shard_members:,} shard members, {s.embedding_rows:,} embedding rows; "
          f"index generation {r.index_generation} (-{r.index_removed:,}); releases "
          f"{ {k: v['release'] for k, v in r.subsets.items()} }, {s.release_rows:,} release rows scrubbed")
    return 0


def _takedown_report(args: argparse.Namespace) -> int:
    from curation.takedowns import report

    data = report(args.lake)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    for item in data["lists"]:
        took = item["ingest_to_propagated_s"]
        print(f"{item['list']}: {item['reason']!r}; {item['entries']:,} entries {item['entries_by_kind']}; "
              f"{item['rows']:,} rows {item['rows_by_kind']} in {len(item['partitions'])} partitions; "
              + (f"propagated {took:.1f} s after ingest" if item["propagated"] else "NOT yet propagated"))
    print(f"{data['taken_down']:,} rows taken down")
    return 0


def _refusals() -> tuple[type[Exception], ...]:
    """The error types the core raises on purpose, with a message meant for the user. The core's own types
    are looked up among the modules already imported: a module that was never imported cannot have raised."""
    found: list[type[Exception]] = [ValueError, FileNotFoundError]
    for module, name in (("curation.wat", "WatReadError"), ("curation.crawls", "ListingError")):
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type) and issubclass(kind, Exception):
            found.append(kind)
    return tuple(found)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _fail(args: argparse.Namespace, message: str) -> int:
    """Print `curation <command>: <message>` to stderr; the exit status for a refused command."""
    command = " ".join(c for c in (args.command, getattr(args, f"{args.command}_command", None)) if c)
    print(f"curation {command}: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not isinstance(exc, _refusals()):
            raise  # a bug: keep the traceback
        return _fail(args, _first_line(exc))


if __name__ == "__main__":
    sys.exit(main())
