"""Payload of the `index` asset: bring the faiss index up to date and report it through Dagster Pipes.

Runs wherever the compute resource puts it (a local subprocess or a SLURM job, with GPUs for k-means when
asked); it imports only `curation` and `dagster_pipes`. Extras: lake_root, config (IndexConfig fields),
force_rebuild.
"""

from dagster_pipes import open_dagster_pipes

from curation.index import IndexConfig, build_index, index_report, verify_index


def main() -> None:
    with open_dagster_pipes() as pipes:
        extras = pipes.extras
        config = IndexConfig(**extras.get("config", {}))
        result = build_index(extras["lake_root"], config, force_rebuild=bool(extras.get("force_rebuild")))
        problems = verify_index(extras["lake_root"], config.modality)
        pipes.log.info(f"{result.factory}: {result.vectors} vectors, recall@{result.k} {result.recall_at_k:.3f} "
                       f"at nprobe {result.nprobe}; +{result.added} -{result.removed}"
                       + (f"; rebuilt: {result.rebuild_reason}" if result.rebuilt else ""))
        pipes.report_asset_materialization(metadata=index_report(result))
        pipes.report_asset_check(
            check_name="index_matches_survivors",
            passed=not problems,
            metadata={"problems": {"raw_value": "\n".join(problems) or "none", "type": "text"},
                      "vectors": {"raw_value": result.vectors, "type": "int"}},
        )


if __name__ == "__main__":
    main()
