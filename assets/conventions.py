"""What every stage asset declares the same way: when it runs on its own, and its blocking checks."""

import dagster as dg

# Materialize when an upstream partition changes, never while a run of this asset is still in progress.
EAGER = dg.AutomationCondition.eager() & ~dg.AutomationCondition.in_progress()


def blocking_check(asset: str | dg.AssetKey, name: str, description: str) -> dg.AssetCheckSpec:
    """A check whose failure stops downstream assets from materializing on bad data."""
    return dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description)
