"""Payload of the `clip` asset: score one partition and report metadata and checks through Dagster Pipes.

Runs wherever the compute resource puts it (a local subprocess or a SLURM GPU job); it imports only
`curation` and `dagster_pipes`. Extras: lake_root, crawl, segment, spec (models spec dict), clip_options.
"""

from dagster_pipes import open_dagster_pipes

from curation.layout import Partition
from curation.scoring import ScoringConfig, report_metadata, score_partition, verify_clip_partition


def main() -> None:
    with open_dagster_pipes() as pipes:
        extras = pipes.extras
        config = ScoringConfig.from_spec(extras["spec"], **extras.get("clip_options", {}))
        part = Partition(extras["crawl"], extras["segment"])
        pipes.log.info(f"{part.key}: scoring with {config.clip.model_name} ({config.clip.pretrained})")
        result = score_partition(extras["lake_root"], part, config)
        problems = verify_clip_partition(extras["lake_root"], part)
        pipes.log.info(f"{part.key}: {result.clip_pass.n_embedded} embedded, {result.clip_pass.n_kept} kept, "
                       f"{result.clip_pass.images_per_s:.1f} img/s on {result.clip_pass.device}")
        pipes.report_asset_materialization(metadata=report_metadata(result, config))
        pipes.report_asset_check(
            check_name="embeddings_aligned",
            passed=not problems,
            metadata={"problems": {"raw_value": "\n".join(problems) or "none", "type": "text"},
                      "embedded": {"raw_value": result.clip_pass.n_embedded, "type": "int"}},
        )


if __name__ == "__main__":
    main()
