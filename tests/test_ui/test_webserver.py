"""The Dagster UI over a real instance: the webserver on loopback, driven by a headless Chromium.

`pairs` and `downloads` are materialized for one partition of the fixture web into a persistent
DAGSTER_HOME; the webserver serves that instance and the same lake; Chromium renders the asset graph and
the `downloads` materialization page. The test reads the rendered DOM and checks the screenshots, which
are kept under $CURATION_TEST_ARTIFACTS/ui (default .data/test-artifacts/ui).

Why `downloads` and not `clip`: clip's charts are markdown metadata long enough that the UI folds them
behind a "[Show Markdown]" button, so a static DOM dump cannot see them, and clip's scoring would double
the test's cost.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
from PIL import Image

from assets.downloads import downloads
from assets.pairs import pairs
from curation.sample.server import SampleWebServer
from resources.downloader import DownloaderResource
from resources.storage import LakeResource
from tests.conftest import SampleWeb, free_port

pytestmark = pytest.mark.ui

REPO = Path(__file__).resolve().parents[2]
SEGMENT = "000"
WINDOW = (1600, 1000)
SERVER_START_TIMEOUT_S = 180  # the code server imports torch and open_clip; slow on a busy 2-core machine
CHROMIUM_TIMEOUT_S = 120


@dataclass(frozen=True)
class Materialized:
    """A DAGSTER_HOME and lake holding one materialization of `pairs` and `downloads`."""

    home: Path
    lake: Path
    crawl_root: Path
    partition: str  # the multi-partition key as the UI shows it: "CC-MAIN-2024-51|000"
    run_id: str
    downloads_table: Path
    downloads_metadata: dict[str, dg.MetadataValue]


@dataclass(frozen=True)
class Page:
    """One page as Chromium rendered it: its visible text nodes in document order, and the files saved."""

    texts: list[str]
    screenshot: Path
    dom: Path

    def follows(self, first: str, then: str) -> bool:
        """Whether a text node `first` is directly followed by a text node `then` (a label and its value)."""
        return any(self.follows_at(i, first, then) for i in range(len(self.texts) - 1))

    def node(self, asset: str) -> list[str]:
        """The text of an asset's node in a lineage graph: its name followed by "Latest event" and more."""
        starts = [i for i in range(len(self.texts) - 1) if self.follows_at(i, asset, "Latest event")]
        assert starts, f"no node for {asset}: {self.texts}"
        return self.texts[starts[0] + 1 : starts[0] + 12]

    def follows_at(self, i: int, first: str, then: str) -> bool:
        return self.texts[i] == first and self.texts[i + 1] == then


class _TextNodes(HTMLParser):
    """Visible text nodes of an HTML document (script and style contents left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._hidden += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden and data.strip():
            self.texts.append(data.strip())


@pytest.fixture(scope="session")  # session: checked before the session fixtures that build the sample web
def chromium() -> str:
    """Debian's chromium (installed by scripts/system-deps.sh). Absent: skip locally, fail in CI."""
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not installed: run `sudo scripts/system-deps.sh chromium` (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def artifacts(pytestconfig: pytest.Config) -> Iterator[Path]:
    """Where the screenshots and DOMs go; their paths are printed at the end even when the tests pass."""
    out = Path(os.environ.get("CURATION_TEST_ARTIFACTS") or REPO / ".data" / "test-artifacts") / "ui"
    out.mkdir(parents=True, exist_ok=True)
    yield out
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print()
        for path in sorted(out.iterdir()):
            print(f"UI test artifact: {path}")


@pytest.fixture(scope="module")
def materialized(
    chromium: str, sample_web: SampleWeb, sample_server: SampleWebServer, tmp_path_factory: pytest.TempPathFactory
) -> Materialized:
    """pairs and downloads for one partition into a fresh persistent DAGSTER_HOME (after the chromium check:
    nothing is built for a test that will be skipped)."""
    base = tmp_path_factory.mktemp("ui")
    home = base / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    lake = base / "lake"
    crawl = sample_web.config.crawl
    resources = {
        "lake": LakeResource(root=str(lake), crawl_root=str(sample_web.root)),
        "downloader": DownloaderResource(allow_loopback=True, processes=1, threads=16),
    }
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("cc_crawl", [crawl])
        result = dg.materialize([pairs, downloads], partition_key=f"{crawl}|{SEGMENT}", resources=resources,
                                instance=instance)
    mat = next(e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("downloads"))
    metadata = mat.step_materialization_data.materialization.metadata
    table = next(lake.glob(f"downloads/crawl={crawl}/segment={SEGMENT}/downloads.parquet"))
    return Materialized(home, lake, sample_web.root, f"{crawl}|{SEGMENT}", result.run_id, table, metadata)


def _post_graphql(base_url: str, query: str) -> dict[str, object]:
    request = urllib.request.Request(f"{base_url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _reset_signals() -> None:
    # Popen children inherit ignored SIGINT from non-interactive shells, and Dagster maps SIGTERM to
    # SIGINT's handler: without the defaults the webserver would ignore both (reference/stack.md §5).
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


@pytest.fixture(scope="module")
def webserver(materialized: Materialized, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """dagster-webserver on 127.0.0.1 over the materialized instance and lake; its base URL."""
    port = free_port(("127.0.0.1",))
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("webserver") / "webserver.log"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(materialized.home),
        "CURATION_LAKE": str(materialized.lake),
        "CURATION_CRAWL_ROOT": str(materialized.crawl_root),
    }
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
             "-p", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_reset_signals,  # own process group: stopped as a whole
        )
    try:
        _wait_until_serving(base_url, proc, log_path)
        assert _post_graphql(base_url, "mutation { setNuxSeen }") == {"data": {"setNuxSeen": True}}
        _assert_code_location_loaded(base_url)
        yield base_url
    finally:
        _stop(proc)


def _wait_until_serving(base_url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"dagster-webserver not serving after {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


def _assert_code_location_loaded(base_url: str) -> None:
    reply = _post_graphql(base_url, """{ workspaceOrError { ... on Workspace { locationEntries { name
        locationOrLoadError { __typename ... on PythonError { message } } } } } }""")
    entries = reply["data"]["workspaceOrError"]["locationEntries"]  # type: ignore[index]
    assert [e["locationOrLoadError"]["__typename"] for e in entries] == ["RepositoryLocation"], entries


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to the whole process group (webserver and code server), then SIGKILL to whatever lingers."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # the code server too, if it outlived the webserver
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def browse(chromium: str, url: str, name: str, artifacts: Path, tmp_path: Path) -> Page:
    """Render `url` in a fresh headless Chromium: save its screenshot and DOM as artifacts, parse the DOM."""
    screenshot, dom = artifacts / f"{name}.png", artifacts / f"{name}.html"
    screenshot.unlink(missing_ok=True)
    profile = tmp_path / f"chromium-{name}"
    # --virtual-time-budget lets the app fetch and render before the capture (without it: a blank page).
    # One run gives both: the DOM on stdout and the screenshot as a file.
    run = subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
         "--virtual-time-budget=15000", "--dump-dom", f"--screenshot={screenshot}", url],
        capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False,
    )
    assert run.returncode == 0, f"chromium failed on {url}:\n{run.stderr[-4000:]}"
    dom.write_text(run.stdout)
    parser = _TextNodes()
    parser.feed(run.stdout)
    return Page(parser.texts, screenshot, dom)


def assert_rendered_png(path: Path) -> None:
    """A real capture of the page: a PNG of the window's size with plenty of content, not one flat colour."""
    assert path.stat().st_size > 30_000, f"{path}: {path.stat().st_size} bytes, too small for a rendered page"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == WINDOW, (image.format, image.size)
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 100, f"{path}: only {len(colours)} colours"
        # Not blank: a sizeable share of the pixels differs from the most common (background) colour.
        background = max(colours)[0] if colours else 0
        assert background < 0.97 * rgb.width * rgb.height, f"{path}: nearly all one colour"


def test_asset_graph_shows_every_asset_with_its_state(
    chromium: str, webserver: str, artifacts: Path, tmp_path: Path
) -> None:
    # The lineage of `dedupe` up to three steps back is the whole graph so far, with asset nodes expanded
    # (the global lineage page folds each group into one box).
    page = browse(chromium, f"{webserver}/assets/dedupe?view=lineage&lineageScope=upstream&lineageDepth=3",
                  "asset-graph", artifacts, tmp_path)
    assert_rendered_png(page.screenshot)
    nodes = {asset: page.node(asset) for asset in ("pairs", "downloads", "clip", "dedupe")}
    # pairs and downloads: the one partition (of 100) this test materialized, checks passed; clip: none yet.
    assert {"1 / 1 Passed", "1% filled"} <= set(nodes["pairs"]), nodes["pairs"]
    assert {"2 / 2 Passed", "1% filled"} <= set(nodes["downloads"]), nodes["downloads"]
    assert "1% filled" not in nodes["clip"], nodes["clip"]
    assert "Never materialized" in nodes["dedupe"], nodes["dedupe"]

    overview = browse(chromium, f"{webserver}/asset-groups", "global-lineage", artifacts, tmp_path)
    assert_rendered_png(overview.screenshot)
    assert "Global asset lineage" in overview.texts
    assert overview.follows("ingest", "2"), overview.texts  # the group box: pairs and downloads
    assert {"clip", "dedupe", "index", "subsets"} <= set(overview.texts)


def test_materialization_page_shows_the_emitted_metadata(
    chromium: str, webserver: str, materialized: Materialized, artifacts: Path, tmp_path: Path
) -> None:
    partition = urllib.parse.quote(materialized.partition, safe="")
    page = browse(chromium, f"{webserver}/assets/downloads?view=events&partition={partition}",
                  "downloads-materialization", artifacts, tmp_path)
    assert_rendered_png(page.screenshot)
    table = pq.read_table(materialized.downloads_table)
    assert page.follows("Partition", materialized.partition), page.texts
    assert page.follows("materialized in run", materialized.run_id[:8]), page.texts
    assert page.follows("dagster/row_count", str(table.num_rows)), page.texts
    assert page.follows("dagster/uri", str(materialized.downloads_table)), page.texts
    assert page.follows("success_rate", str(materialized.downloads_metadata["success_rate"].value)), page.texts
    # The by_status markdown table, rendered as a table: every status with its count in the lake's table.
    by_status = page.texts[page.texts.index("by_status") + 1 : page.texts.index("by_reason")]
    statuses = table.column("status").value_counts().to_pylist()
    assert by_status[:2] == ["status", "count"], by_status
    assert {(s["values"], str(s["counts"])) for s in statuses} == set(zip(by_status[2::2], by_status[3::2],
                                                                          strict=True)), by_status
    assert "by_reason" in page.texts and "http_404" in page.texts  # the planted 404s, counted by reason
