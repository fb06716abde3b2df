"""Dagster assets, checks, partitions, sensors and the definitions loaded by workspace.yaml."""
