"""Dagster resources: configuration and lifecycle only, no pipeline logic."""
