"""The `index` asset: a faiss ANN index over the kept, deduplicated image embeddings, grown incrementally."""

from pathlib import Path

import dagster as dg
from dagster_slurm import ComputeResource
from pydantic import Field

from assets.conventions import EAGER, LAKE_WRITER_POOL, blocking_check
from assets.dedupe import dedupe
from assets.metadata import dispatched_result, explorer_link
from curation.index import IndexConfig
from resources.storage import LakeResource

PAYLOAD = str(Path(__file__).parent / "payloads" / "build_index.py")
DEFAULTS = IndexConfig()


class IndexRunConfig(dg.Config):
    """How the index is chosen and tuned (a change of budget, thresholds or modality rebuilds it)."""

    modality: str = Field(default=DEFAULTS.modality, description="'image' or 'text' embeddings")
    memory_budget_gb: float = Field(default=DEFAULTS.memory_budget_bytes / 2**30,
                                    description="memory the index may take; decides Flat / IVF-Flat / IVF-PQ")
    flat_max_vectors: int = Field(default=DEFAULTS.flat_max_vectors, description="exact search up to this many")
    target_recall: float = Field(default=DEFAULTS.target_recall, description="recall@k nprobe is tuned to reach")
    max_query_ms: float = Field(default=DEFAULTS.max_query_ms, description="p99 single-query latency budget")
    force_rebuild: bool = Field(default=False, description="retrain from scratch even when an update would do")
    gpus: int | None = Field(default=None, description="GPUs to request (k-means on GPU when faiss-gpu is "
                             "installed); default: CURATION_INDEX_GPUS, 1 under the slurm deployment")


def build_index_asset(default_gpus: int = 0, explorer_url: str | None = None) -> dg.AssetsDefinition:
    """The `index` asset; `default_gpus` is what a run requests when its config leaves `gpus` unset; `explorer_url`
    (CURATION_EXPLORER_URL): where `curation serve` runs the explorer over this lake, linked from the metadata."""

    @dg.asset(
        deps=[dedupe],
        kinds={"faiss", "slurm"},
        group_name="index",
        automation_condition=EAGER,
        pool=LAKE_WRITER_POOL,
        check_specs=[
            blocking_check(
                "index",
                "index_matches_survivors",
                "The index holds exactly one vector per dedupe survivor of every partition it covers, "
                "covers every deduplicated partition, and its id table agrees with it.",
            ),
        ],
    )
    def index(context: dg.AssetExecutionContext, config: IndexRunConfig, lake: LakeResource,
              compute: ComputeResource) -> dg.MaterializeResult:
        """A faiss index over the kept, deduplicated image embeddings (ids are uids), its type chosen from the
        vector count and a memory budget the way autofaiss does (exact Flat when small; IVF-Flat, or OPQ+IVF-PQ
        when the raw vectors do not fit), trained on a sample and filled in batches from the memory-mapped npy
        files. New partitions are added and changed ones replaced in place; it is rebuilt when its type no
        longer fits. recall@10 against exact search and query latency are in the metadata; search it with
        `curation index search LAKE --text ...`."""
        gpus = default_gpus if config.gpus is None else config.gpus
        settings = IndexConfig(modality=config.modality, memory_budget_bytes=int(config.memory_budget_gb * 2**30),
                               flat_max_vectors=config.flat_max_vectors, target_recall=config.target_recall,
                               max_query_ms=config.max_query_ms, use_gpu=gpus > 0)
        invocation = compute.run(
            context=context,
            payload_path=PAYLOAD,
            extras={"lake_root": lake.root, "config": {
                "modality": settings.modality, "memory_budget_bytes": settings.memory_budget_bytes,
                "flat_max_vectors": settings.flat_max_vectors, "target_recall": settings.target_recall,
                "max_query_ms": settings.max_query_ms, "use_gpu": settings.use_gpu,
            }, "force_rebuild": config.force_rebuild},
            extra_slurm_opts={"gpus_per_node": gpus} if gpus else None,
        )
        return dispatched_result(invocation, "index", explorer_link(explorer_url))

    return index


index = build_index_asset()
