"""Payload of the CPU stages (`pairs`, `downloads`) when they run as jobs on the compute resource.

It imports only `curation` and `dagster_pipes`. Extras: stage ("pairs" or "downloads"), lake_root, crawl,
segment, crawl_root (pairs), download_options (downloads).
"""

from dagster_pipes import open_dagster_pipes

from curation.layout import Partition
from curation.report import send
from curation.stages import materialize_downloads, materialize_pairs


def main() -> None:
    with open_dagster_pipes() as pipes:
        extras = pipes.extras
        part = Partition(extras["crawl"], extras["segment"])
        if extras["stage"] == "pairs":
            report = materialize_pairs(extras["lake_root"], extras["crawl_root"], part)
        elif extras["stage"] == "downloads":
            report = materialize_downloads(extras["lake_root"], part, extras["download_options"])
        else:
            raise ValueError(f"unknown stage {extras['stage']!r}")
        send(report, pipes)


if __name__ == "__main__":
    main()
