"""`build_definitions`: every asset, check, sensor and resource wired to one `Settings`.

Kept apart from `assets.definitions` (which builds them from the environment when it is imported) so that
`curation run` can wire them to its own flags without the environment's settings being loaded, or refused.
"""

from __future__ import annotations

import dagster as dg

from assets.clip import clip
from assets.dedupe import dedupe
from assets.downloads import build_downloads
from assets.index import build_index_asset
from assets.pairs import build_pairs
from assets.sensors import build_crawl_sensor, crawl_sensor_default_running
from assets.subsets import build_subset_assets, build_subset_schedule
from assets.takedowns import build_takedown_sensor, build_takedowns_asset
from curation.subsets import load_registry
from resources.clip_model import ClipModelResource
from resources.compute import build_compute
from resources.downloader import DownloaderResource
from resources.settings import Settings
from resources.storage import LakeResource


def build_definitions(settings: Settings) -> dg.Definitions:
    """All definitions, wired to the given settings (the UI and `curation run` use the same ones).

    `Settings.check` runs first, so a lake that cannot be written, a bad models spec or subsets registry
    fails here with the variable to fix, not at the first step that reads it."""
    settings.check()
    subsets = build_subset_assets(load_registry(settings.subsets_registry, settings.lake_root))  # + saved searches
    on_compute = settings.cpu_stages == "compute"
    return dg.Definitions(
        assets=[build_pairs(on_compute), build_downloads(on_compute), clip, dedupe,
                build_index_asset(settings.index_gpus or 0, settings.explorer_url), *subsets,
                build_takedowns_asset(settings.subsets_registry)],
        schedules=[build_subset_schedule(settings.subset_cron)],
        sensors=[
            build_crawl_sensor(crawl_sensor_default_running(settings.crawl_root)),
            build_takedown_sensor(),
            # Declarative automation (downstream partitions follow upstream ones) needs a running
            # automation sensor; Dagster's implicit one is off until enabled in the UI.
            dg.AutomationConditionSensorDefinition(
                "automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING
            ),
        ],
        resources={
            "lake": LakeResource(root=settings.lake_root, crawl_root=settings.crawl_root, crawls=list(settings.crawls)),
            "compute": build_compute(settings),
            "downloader": DownloaderResource(allow_loopback=settings.allow_loopback),
            "clip_model": ClipModelResource(spec_path=settings.clip_spec, device=settings.clip_device,
                                            gpus=settings.clip_gpus or 0),
        },
    )
