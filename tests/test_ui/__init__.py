"""Tests of the Dagster UI: the real webserver driven by a headless Chromium."""
