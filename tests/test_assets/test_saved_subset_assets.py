"""A search saved into the lake is a subset asset: in the definitions and the refresh job, materialized with its
checks, and requested by automation after each new index generation (what changes its matches)."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import numpy as np

from assets.subsets import build_subset_assets
from assets.wiring import build_definitions
from curation.saved_queries import SavedQuery
from curation.search import Filters, Generation
from curation.subsets import SubsetDefinition, load_registry, save_subset
from resources.settings import Settings
from resources.storage import LakeResource
from tests.conftest import SampleWeb

KEY = dg.AssetKey(["subsets", "like_first"])


def test_a_saved_search_is_an_asset_that_follows_the_index(indexed_lake: Path, sample_web: SampleWeb,
                                                           tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(indexed_lake, lake)
    generation = Generation.load(str(lake))
    vector = generation.store.embeddings(np.array([0]))[0]
    query = SavedQuery.from_vector(vector, generation.manifest, "image", Filters(), top_k=5)
    assert save_subset(str(lake), SubsetDefinition.from_query("like_first", "", query)).rows == 5

    defs = build_definitions(Settings(lake_root=str(lake), crawl_root=str(sample_web.root)))
    graph = defs.resolve_asset_graph()
    node = graph.get(KEY)
    assert dg.AssetKey("index") in node.parent_keys and node.automation_condition is not None
    assert graph.get(dg.AssetKey(["subsets", "laion_aesthetic"])).automation_condition is None  # schedule only
    assert KEY in defs.resolve_job_def("refresh_subsets").asset_layer.selected_asset_keys

    [asset] = [a for a in build_subset_assets(load_registry(None, str(lake))) if a.key == KEY]
    result = dg.materialize([asset], resources={"lake": LakeResource(root=str(lake),
                                                                     crawl_root=str(sample_web.root))})
    assert result.success
    assert all(c.passed for c in result.get_asset_check_evaluations())
    [mat] = result.asset_materializations_for_node("subsets__like_first")
    assert mat.metadata["release"].value == 1 and mat.metadata["new_release"].value is False  # saved = released

    instance = dg.DagsterInstance.ephemeral()
    only = dg.AssetSelection.assets(KEY)
    evaluated = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=only)
    assert evaluated.get_num_requested(KEY) == 0  # nothing upstream materialized yet
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="dedupe"))
    requested = []
    for _ in range(2):
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="index"))  # a new generation
        evaluated = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=only,
                                                      cursor=evaluated.cursor)
        requested.append(evaluated.get_num_requested(KEY))
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=KEY))  # the re-export ran
        evaluated = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=only,
                                                      cursor=evaluated.cursor)
        requested.append(evaluated.get_num_requested(KEY))
    assert requested == [1, 0, 1, 0]
