"""The `dedupe` asset: exact and near-duplicate clusters across every partition of every crawl, incrementally."""

import dagster as dg
from pydantic import Field

from assets.clip import clip
from assets.conventions import EAGER, LAKE_WRITER_POOL, blocking_check
from assets.metadata import stage_result
from curation.dedupe import DedupeConfig
from curation.stages import materialize_dedupe
from resources.storage import LakeResource


class DedupeRunConfig(dg.Config):
    """What counts as a duplicate (changing it rebuilds the global state from every partition)."""

    radius: int = Field(default=DedupeConfig().radius, description="pHash Hamming radius in bits")
    use_embeddings: bool = Field(default=False, description="also merge CLIP image embeddings at cosine >= threshold")
    embedding_threshold: float = Field(default=DedupeConfig().embedding_threshold,
                                       description="clip-retrieval's near-duplicate cosine")


@dg.asset(
    deps=[clip],
    kinds={"python", "duckdb"},
    group_name="dedupe",
    automation_condition=EAGER,
    pool=LAKE_WRITER_POOL,
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
    return stage_result(context, materialize_dedupe(lake.root, settings))
