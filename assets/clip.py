"""The `clip` asset: one CLIP pass per partition, dispatched through the compute resource (dagster-slurm)."""

from pathlib import Path

import dagster as dg
from dagster_slurm import ComputeResource

from assets.conventions import EAGER, blocking_check
from assets.downloads import downloads
from assets.metadata import dispatched_result
from assets.partitions import crawl_segment_partitions, partition_of
from resources.clip_model import ClipModelResource
from resources.storage import LakeResource

PAYLOAD = str(Path(__file__).parent / "payloads" / "clip_scores.py")


@dg.asset(
    name="clip",
    partitions_def=crawl_segment_partitions,
    deps=[downloads],
    kinds={"pytorch", "slurm"},
    group_name="clip",
    automation_condition=EAGER,
    check_specs=[
        blocking_check(
            "clip",
            "embeddings_aligned",
            "uids.npy, img_emb.npy and text_emb.npy hold one L2-normalised row per ok row of the "
            "table, in order, and exactly the ok rows carry similarity, tag and head scores.",
        ),
    ],
)
def clip(
    context: dg.AssetExecutionContext, lake: LakeResource, compute: ComputeResource, clip_model: ClipModelResource
) -> dg.MaterializeResult:
    """One CLIP pass over the segment's downloaded images and their captions: L2-normalised float16 image
    and text embeddings (with an aligned uid array) and a per-pair table with cosine similarity, the
    language-aware keep decision and reason, the zero-shot NSFW tag, punsafe / pwatermark / aesthetic
    head scores, and the model and checkpoint hashes behind every score. Runs as a Pipes payload on the
    compute resource (a SLURM GPU job when so deployed); histograms are in the metadata."""
    part = partition_of(context)
    extra_slurm_opts = {"gpus_per_node": clip_model.gpus} if clip_model.gpus else None
    invocation = compute.run(
        context=context,
        payload_path=PAYLOAD,
        extras={
            "lake_root": lake.root,
            "crawl": part.crawl,
            "segment": part.segment,
            "spec": clip_model.spec(),
            "clip_options": clip_model.clip_options(),
        },
        extra_slurm_opts=extra_slurm_opts,
        poll_timeout=clip_model.walltime_s + 300,
    )
    return dispatched_result(invocation, "clip")
