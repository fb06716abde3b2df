"""Partitions: dynamic crawl x static segment index, which holds at Common Crawl scale.

Each crawl has ~100 segments (30-70k WAT files), so a partition per WAT file would pass Dagster's
~100k-partition guideline after one or two crawls. A partition per (crawl, segment) adds 100
partitions per crawl: 40 years of monthly crawls stay under 50k. Segment keys are 3-digit indexes into
the crawl's sorted segment list, since segment ids differ per crawl.
"""

from __future__ import annotations

import dagster as dg

from curation.layout import Partition

SEGMENTS_PER_CRAWL = 100

crawl_partitions = dg.DynamicPartitionsDefinition(name="cc_crawl")
segment_partitions = dg.StaticPartitionsDefinition([f"{i:03d}" for i in range(SEGMENTS_PER_CRAWL)])
crawl_segment_partitions = dg.MultiPartitionsDefinition({"crawl": crawl_partitions, "segment": segment_partitions})


def partition_key(crawl: str, segment: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"crawl": crawl, "segment": segment})


def partition_of(context: dg.AssetExecutionContext) -> Partition:
    """The core's (crawl, segment) for the partition being materialized."""
    key = context.partition_key
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
        return Partition(dims["crawl"], dims["segment"])
    return Partition.from_key(str(key))
