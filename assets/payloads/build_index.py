"""Payload of the `index` asset: bring the faiss index up to date and report it through Dagster Pipes.

Runs wherever the compute resource puts it (a local subprocess or a SLURM job, with GPUs for k-means when
asked); it imports only `curation` and `dagster_pipes`. Extras: lake_root, config (IndexConfig fields),
force_rebuild.
"""

from dagster_pipes import open_dagster_pipes

from curation.index import IndexConfig
from curation.report import send
from curation.stages import materialize_index


def main() -> None:
    with open_dagster_pipes() as pipes:
        extras = pipes.extras
        config = IndexConfig(**extras.get("config", {}))
        send(materialize_index(extras["lake_root"], config, force_rebuild=bool(extras.get("force_rebuild"))), pipes)


if __name__ == "__main__":
    main()
