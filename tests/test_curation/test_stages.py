"""curation.stages: the plain options a payload receives become the same config and policy as in process."""

from __future__ import annotations

import pytest

from curation.download import DownloadConfig
from curation.netguard import NetPolicy
from curation.stages import download_options


def test_download_options_build_config_and_policy() -> None:
    config, policy = download_options({"image_size": 128, "threads": 4, "allow_cidrs": ["10.0.0.0/8"]})
    assert config == DownloadConfig(image_size=128, threads=4)
    assert policy == NetPolicy(allow_cidrs=("10.0.0.0/8",))
    _, loopback = download_options({"allow_loopback": True})
    assert loopback == NetPolicy.with_loopback()
    _, closed = download_options({})
    assert closed == NetPolicy() and "127.0.0.0/8" not in closed.allow_cidrs


def test_unknown_download_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown download options"):
        download_options({"allow_everything": True})

