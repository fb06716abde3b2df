"""What every stage asset declares the same way: when it runs on its own, and its blocking checks."""

import dagster as dg

# The global assets that rewrite shared lake state (dedupe tables and state, the index, subset releases, the
# takedowns' scrubbing of all of them) run one at a time: the instance's dagster.yaml gives pools a default limit
# of 1 (`curation run` and `make ui` write it into a new DAGSTER_HOME).
LAKE_WRITER_POOL = "lake_writer"
POOL_YAML = "concurrency:\n  pools:\n    default_limit: 1\n"

# Materialize when an upstream partition changes, never while a run of this asset is still in progress.
EAGER = dg.AutomationCondition.eager() & ~dg.AutomationCondition.in_progress()


def blocking_check(asset: str | dg.AssetKey, name: str, description: str) -> dg.AssetCheckSpec:
    """A check whose failure stops downstream assets from materializing on bad data."""
    return dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description)
