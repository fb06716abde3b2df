"""Framework-free core of the curation platform: one module per pipeline stage, no Dagster imports."""

__version__ = "0.1.0"
