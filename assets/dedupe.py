"""The `dedupe` asset: exact and near-duplicate clusters across every partition of every crawl, incrementally."""

import dagster as dg
from pydantic import Field

from assets.clip import clip
from assets.conventions import EAGER, blocking_check
from assets.metadata import counts_table
from curation import plots
from curation.dedupe import DedupeConfig, dedupe_lake, verify_dedupe
from curation.gallery import gallery_png, read_sample_image
from curation.integrity import verify_partition_counts
from curation.io import finished_partitions
from curation.layout import Partition
from resources.storage import LakeResource


class DedupeRunConfig(dg.Config):
    """What counts as a duplicate (changing it rebuilds the global state from every partition)."""

    radius: int = Field(default=DedupeConfig().radius, description="pHash Hamming radius in bits")
    use_embeddings: bool = Field(default=False, description="also merge CLIP image embeddings at cosine >= threshold")
    embedding_threshold: float = Field(default=0.94, description="clip-retrieval's near-duplicate cosine")


@dg.asset(
    deps=[clip],
    kinds={"python", "duckdb"},
    group_name="dedupe",
    automation_condition=EAGER,
    check_specs=[
        blocking_check(
            "dedupe",
            "one_survivor_per_cluster",
            "Every cluster has exactly one survivor, its cluster_id is the survivor's uid, and only "
            "non-survivors carry a reason.",
        ),
        blocking_check(
            "dedupe",
            "rows_match_kept_clip",
            "Each deduped partition has one dedupe row per clip row kept by the similarity filter.",
        ),
        blocking_check(
            "dedupe",
            "partition_counts_agree",
            "Per partition, row counts agree along the lineage: downloads and clip hold one row per "
            "pair, dedupe one row per kept clip row.",
        ),
    ],
)
def dedupe(context: dg.AssetExecutionContext, config: DedupeRunConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Global dedupe of the kept pairs of every finished `clip` partition, in layers: identical (url, text),
    identical bytes (sha256), pHash within a Hamming radius (multi-index hashing, never all pairs) and,
    optionally, CLIP image-embedding cosine. Incremental: only new or re-scored partitions are matched
    (against everything already taken), clusters are recomputed from the stored links, and only partitions
    whose rows changed are rewritten. Per partition a `dedupe` table: uid, phash, cluster_id (the
    survivor's uid), cluster_size, survivor and reason; survivor = highest CLIP similarity, then larger
    original, then earliest crawl, then smallest uid."""
    settings = DedupeConfig(radius=config.radius, use_embeddings=config.use_embeddings,
                            embedding_threshold=config.embedding_threshold)
    parts = [p for p in finished_partitions(lake.lake.stage_dir("clip"))]
    result = dedupe_lake(lake.root, parts, settings)
    problems = verify_dedupe(lake.root, parts)
    count_problems = verify_partition_counts(lake.root, parts)
    context.log.info(f"{len(parts)} partitions: {result.nodes} kept pairs, {result.duplicates_removed} duplicates "
                     f"removed in {result.duplicate_clusters} clusters; rewrote {len(result.partitions_rewritten)}")
    sizes = sorted(result.cluster_sizes.items())
    gallery_rows = []
    for cluster in result.examples:
        row = []
        for m in cluster:
            data = (read_sample_image(lake.root, Partition(m.crawl, m.segment), m.shard, m.key)
                    if m.shard is not None and m.key is not None else None)
            row.append((data, f"{m.segment}/{m.uid % 100000:05d}"))
        gallery_rows.append(row)
    size_chart = plots.funnel_png([(f"size {s}", n) for s, n in sizes if s > 1][:12] or [("no duplicates", 0)],
                                  title="duplicate clusters by size")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.nodes,
            "partitions": result.partitions,
            "partitions_rewritten": dg.MetadataValue.json(list(result.partitions_rewritten)),
            "clusters": result.clusters,
            "duplicate_clusters": result.duplicate_clusters,
            "duplicates_removed": result.duplicates_removed,
            "survivors": result.clusters,
            "by_reason": counts_table(result.by_reason),
            "links_by_layer": dg.MetadataValue.json(result.edges_by_layer),
            "cluster_sizes": counts_table({str(s): n for s, n in sizes}, "size"),
            "charts": dg.MetadataValue.md(plots.markdown_image(size_chart, "cluster sizes")),
            "gallery": dg.MetadataValue.md(plots.markdown_image(
                gallery_png(gallery_rows, title="example clusters (survivor first)"), "example clusters")
                if gallery_rows else "no duplicate clusters"),
            "radius": settings.radius,
            "duration_s": round(result.seconds, 2),
        },
        check_results=[
            dg.AssetCheckResult(check_name="one_survivor_per_cluster", passed=not problems["clusters"],
                                metadata={"problems": "\n".join(problems["clusters"][:20]) or "none"}),
            dg.AssetCheckResult(check_name="rows_match_kept_clip", passed=not problems["rows"],
                                metadata={"problems": "\n".join(problems["rows"][:20]) or "none"}),
            dg.AssetCheckResult(check_name="partition_counts_agree", passed=not count_problems,
                                metadata={"problems": "\n".join(count_problems[:20]) or "none"}),
        ],
    )
