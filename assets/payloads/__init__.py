"""Payload scripts run by the compute resource (locally or as SLURM jobs); they import only curation and
dagster_pipes."""
