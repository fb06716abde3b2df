"""Payload of the `clip` asset: score one partition and report it through Dagster Pipes.

Runs wherever the compute resource puts it (a local subprocess or a SLURM GPU job); it imports only
`curation` and `dagster_pipes`. Extras: lake_root, crawl, segment, spec (models spec dict), clip_options.
"""

from dagster_pipes import open_dagster_pipes

from curation.layout import Partition
from curation.report import send
from curation.stages import materialize_clip


def main() -> None:
    with open_dagster_pipes() as pipes:
        extras = pipes.extras
        part = Partition(extras["crawl"], extras["segment"])
        send(materialize_clip(extras["lake_root"], part, extras["spec"], extras.get("clip_options")), pipes)


if __name__ == "__main__":
    main()
