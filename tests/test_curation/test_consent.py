"""Consent at crawl time: the robots.txt matcher (RFC 9309 precedence, wildcards, groups), robots.txt fetching
through the guarded opener (once per origin, every answer class, hostile files, the SSRF guard), the TDMRep
header, and img2dataset runs over a sample web with planted robots.txt hosts and TDM-reserved images,
checked against its truth."""

from __future__ import annotations

import random
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pytest
from img2dataset.downloader import download_image

from curation import records as R
from curation.consent import (
    ROBOTS_PREFIX,
    ConsentPolicy,
    RobotsDisallowed,
    RobotsUnreachable,
    TdmReserved,
    decode_robots_txt,
    normalize_path,
    parse_robots_txt,
    rules_for,
)
from curation.download import DownloadConfig, DownloadResult, classify_error, download_images, user_agent, verify_shards
from curation.netguard import NetBlocked, NetGuard, NetPolicy
from curation.sample.consent import CONSENT_BEHAVIOURS
from curation.sample.server import SampleWebServer, serve_sample_web
from curation.sample.web import SampleWebConfig, generate_sample_web
from curation.stages import download_options
from tests.conftest import free_port
from tests.test_curation.test_netguard import LoopbackServer, Reply, noise_image

JPG = noise_image(200, 120, "JPEG", seed=5)


def allows(robots: str, path: str, token: str = "curation") -> bool:
    return rules_for(parse_robots_txt(robots), token).allows(normalize_path(path))


# --- the matcher ---------------------------------------------------------------------------------------


def test_longest_match_wins_whatever_the_order() -> None:
    for robots in ("User-agent: *\nDisallow: /a/\nAllow: /a/b/\n", "User-agent: *\nAllow: /a/b/\nDisallow: /a/\n"):
        assert allows(robots, "/a/b/c.jpg") and not allows(robots, "/a/c.jpg") and allows(robots, "/b.jpg")
    # RFC 9309's own example: the longer Disallow beats the shorter Allow
    rfc = "User-agent: *\nAllow: /example/page/\nDisallow: /example/page/disallowed.gif\n"
    assert allows(rfc, "/example/page/") and not allows(rfc, "/example/page/disallowed.gif")


def test_allow_wins_a_tie() -> None:
    assert allows("User-agent: *\nDisallow: /p\nAllow: /p\n", "/page")
    assert allows("User-agent: *\nDisallow: /*.jpg\nAllow: /a/x.*\n", "/a/x.jpg")  # both 6 characters
    assert not allows("User-agent: *\nDisallow: /*.jpg\nAllow: /a/*\n", "/a/x.jpg")  # 6 beats 4


def test_star_wildcard() -> None:
    robots = "User-agent: *\nDisallow: /foo*bar\nDisallow: /*/secret/\n"
    assert not allows(robots, "/foobar") and not allows(robots, "/foo/x/bar/baz")
    assert allows(robots, "/fobar") and allows(robots, "/foo/x/ba")
    assert not allows(robots, "/x/y/secret/z.png") and allows(robots, "/secret/z.png")


def test_dollar_anchors_the_end() -> None:
    robots = "User-agent: *\nDisallow: /*.gif$\nDisallow: /$\n"
    assert not allows(robots, "/a/b.gif") and not allows(robots, "/")
    assert allows(robots, "/a/b.gif?x=1") and allows(robots, "/a/b.gifx") and allows(robots, "/index.html")


def test_wildcard_length_counts_as_written() -> None:
    robots = "User-agent: *\nAllow: /*.css\nDisallow: /assets/\nAllow: /assets/*.css$\n"
    assert allows(robots, "/assets/site.css")  # the 14-character Allow beats the 8-character Disallow
    assert not allows(robots, "/assets/site.css?v=2")  # only /*.css (6) matches besides /assets/ (8)
    assert allows(robots, "/other/site.css")


def test_our_groups_replace_star_and_combine() -> None:
    robots = ("User-agent: *\nDisallow: /\n\nUser-agent: Curation/2.1 (+https://example.org)\nDisallow: /a/\n\n"
              "user-agent: otherbot\nuser-agent: CURATION\nDisallow: /b/\n")
    rules = rules_for(parse_robots_txt(robots), "curation")
    assert rules.group == "curation"
    assert not rules.allows("/a/x") and not rules.allows("/b/x") and rules.allows("/c/x")  # `*` is ignored
    assert rules_for(parse_robots_txt(robots), "somebot").group == "*"
    assert not allows(robots, "/c/x", token="somebot")
    other_only = "User-agent: otherbot\nDisallow: /\n"
    assert rules_for(parse_robots_txt(other_only), "curation").group is None and allows(other_only, "/x")


def test_lines_outside_groups_and_empty_rules() -> None:
    robots = ("Disallow: /before-any-group/\n# a comment\nUser-agent: * # trailing comment\nDisallow:\n"
              "Crawl-delay: 10\nSitemap: http://example.org/s.xml\nDisallow /no-colon/\nDisallow: /x/ # why\n")
    assert allows(robots, "/before-any-group/a") and allows(robots, "/no-colon/a")
    assert not allows(robots, "/x/a") and allows(robots, "/y")


def test_consecutive_agents_share_a_group_and_a_rule_ends_it() -> None:
    robots = "User-agent: a\nUser-agent: curation\nDisallow: /shared/\nUser-agent: b\nDisallow: /b/\n"
    assert not allows(robots, "/shared/x") and allows(robots, "/b/x")


def test_percent_encoding_is_compared_normalized() -> None:
    assert not allows("User-agent: *\nDisallow: /%7Efoo\n", "/~foo/bar")  # unreserved: decoded
    assert not allows("User-agent: *\nDisallow: /~foo\n", "/%7efoo/bar")
    assert allows("User-agent: *\nDisallow: /a%2Fb\n", "/a/b")  # reserved: stays encoded
    assert not allows("User-agent: *\nDisallow: /a%2fb\n", "/a%2Fb")
    assert not allows("User-agent: *\nDisallow: /ö\n", "/%C3%B6.jpg")
    assert not allows("User-agent: *\nDisallow: /%c3%b6\n", "/ö.jpg")


def test_robots_txt_itself_is_always_allowed_and_no_file_allows_all() -> None:
    assert allows("User-agent: *\nDisallow: /\n", "/robots.txt")
    assert allows("", "/anything") and allows("User-agent: *\n", "/anything")


def test_a_value_without_a_leading_slash_is_read_from_the_root() -> None:
    assert not allows("User-agent: *\nDisallow: private/\n", "/private/x")


def test_garbage_never_raises_and_allows_all() -> None:
    rng = random.Random(0)
    for _ in range(300):
        data = rng.randbytes(rng.randrange(0, 3000))
        groups = parse_robots_txt(decode_robots_txt(data, 1000))
        rules_for(groups, "curation").allows("/x")  # must not raise
    assert allows(decode_robots_txt(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 300, 10_000), "/x")
    assert not allows(decode_robots_txt(b"\xef\xbb\xbfUser-agent: *\r\nDisallow: /x\r\n", 100), "/x")  # BOM, CRLF


def test_cap_drops_the_cut_line() -> None:
    data = b"User-agent: *\nDisallow: /a/\nDisallow: /abcdef/\n"
    assert decode_robots_txt(data, len(data)) == data.decode()
    text = decode_robots_txt(data, len(data) - 3)  # cuts "Disallow: /abcdef/": it must not become /abc
    assert text == "User-agent: *\nDisallow: /a/\n"


def test_hostile_patterns_match_in_linear_time() -> None:
    robots = "User-agent: *\n" + "".join(f"Disallow: /{'*a' * 400}{i}$\n" for i in range(200))
    rules = rules_for(parse_robots_txt(robots), "curation")
    started = time.perf_counter()
    assert rules.allows("/" + "a" * 2000 + "b")
    assert time.perf_counter() - started < 2.0


def test_reasons_and_statuses_of_consent_errors() -> None:
    assert classify_error(f"{ROBOTS_PREFIX}http://h/robots.txt has 'Disallow: /'") == R.REASON_ROBOTS_TXT
    assert classify_error("TDM reservation: http://h/x.jpg is served with tdm-reservation: 1") == "tdm_reservation"
    unanswered = "<urlopen error timed out>; fetching http://h/robots.txt, so http://h/x.jpg was not requested"
    assert classify_error(unanswered) == "timeout"
    assert set(R.BLOCKED_REASONS) >= {R.REASON_ROBOTS_TXT, R.REASON_TDM_RESERVATION, R.REASON_SSRF_BLOCKED}


# --- fetching robots.txt through the guarded opener ---------------------------------------------------

POLICY = NetPolicy(allow_cidrs=("127.0.0.2/32",))  # the test host only: 127.0.0.1 is "internal"


def _opener(policy: NetPolicy = POLICY, deadline_s: float | None = 5.0,
            **consent: Any) -> urllib.request.OpenerDirector:
    settings = {"user_agent": user_agent("curation"), "timeout_s": 2.0, **consent}
    guard = NetGuard(policy, max_connections_per_host=4, deadline_s=deadline_s,
                     extensions=(ConsentPolicy(**settings),))
    return guard.build_opener()


def _get(opener: urllib.request.OpenerDirector, url: str) -> bytes:
    with opener.open(url, timeout=5) as r:
        data: bytes = r.read()
        return data


@pytest.fixture
def site() -> Iterator[LoopbackServer]:
    with LoopbackServer({f"/{d}/{i}.jpg": Reply(body=JPG) for d in ("private", "open", "x") for i in range(8)},
                        host="127.0.0.2") as server:
        yield server


def test_disallowed_url_is_never_requested_and_robots_fetched_once(site: LoopbackServer) -> None:
    site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nDisallow: /private/\n")
    opener = _opener()
    errors: list[str] = []

    def fetch(i: int) -> None:
        for folder in ("private", "open"):
            try:
                assert _get(opener, site.url(f"/{folder}/{i}.jpg")) == JPG
            except RobotsDisallowed as err:
                errors.append(str(err))

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(site.requests)["/robots.txt"] == 1  # 8 threads at once, one fetch
    assert not any(p.startswith("/private/") for p in site.requests)
    assert sorted(p for p in site.requests if p.startswith("/open/")) == [f"/open/{i}.jpg" for i in range(8)]
    assert len(errors) == 8 and all(e.startswith(ROBOTS_PREFIX) and "'Disallow: /private/'" in e for e in errors)
    robots_agents = [ua for path, ua in zip(site.requests, site.user_agents, strict=True) if path == "/robots.txt"]
    assert robots_agents == [user_agent("curation")]  # as img2dataset asks for images (see below)


@pytest.mark.parametrize(("reply", "allowed"), [
    (Reply(404, b"nope"), True),  # unavailable: no restrictions
    (Reply(403, b"forbidden"), True),  # any 4xx but 429
    (Reply(429, b"slow down"), False),  # unreachable: the whole host
    (Reply(503, b"busy"), False),
    (Reply(500, b"boom"), False),
    (Reply(body=bytes(range(256)) * 64), True),  # binary garbage: no rules
    (Reply(body=b"<html><body>Welcome!</body></html>", headers={"Content-Type": "text/html"}), True),
])
def test_each_kind_of_answer(site: LoopbackServer, reply: Reply, allowed: bool) -> None:
    site.routes["/robots.txt"] = reply
    opener = _opener()
    if allowed:
        assert _get(opener, site.url("/x/1.jpg")) == JPG
    else:
        with pytest.raises(RobotsDisallowed, match=rf"is unreachable \(HTTP {reply.status}\)"):
            _get(opener, site.url("/x/1.jpg"))
        assert "/x/1.jpg" not in site.requests


def test_huge_robots_txt_is_read_to_the_cap(site: LoopbackServer) -> None:
    filler = b"# " + b"x" * 1000 + b"\n"
    body = b"User-agent: *\nDisallow: /private/\n" + filler * 700 + b"Disallow: /x/\n"  # ~700 KB
    site.routes["/robots.txt"] = Reply(body=body, chunked=True)
    opener = _opener(robots_max_bytes=512 * 1024)
    with pytest.raises(RobotsDisallowed):
        _get(opener, site.url("/private/1.jpg"))
    assert _get(opener, site.url("/x/1.jpg")) == JPG  # its rule lies past the cap


def test_an_endless_robots_txt_is_cut_off(site: LoopbackServer) -> None:
    site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nDisallow: /private/\n" + b"#" * (64 << 20), chunked=True)
    started = time.monotonic()
    opener = _opener(robots_max_bytes=4096)
    with pytest.raises(RobotsDisallowed):
        _get(opener, site.url("/private/1.jpg"))
    assert time.monotonic() - started < 10


def test_a_robots_txt_that_does_not_answer_fails_the_host_with_its_own_reason(site: LoopbackServer) -> None:
    site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nAllow: /\n", delay_s=3.0)
    opener = _opener(timeout_s=0.5)
    with pytest.raises(RobotsUnreachable) as err:
        _get(opener, site.url("/x/1.jpg"))
    assert classify_error(str(err.value)) == "timeout" and "/x/1.jpg" not in site.requests


def test_redirect_hops_are_checked_against_their_own_hosts_robots(site: LoopbackServer) -> None:
    site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nDisallow: /private/\n")
    site.routes["/moved.jpg"] = Reply(302, headers={"Location": "/private/1.jpg"})
    site.routes["/moved-ok.jpg"] = Reply(302, headers={"Location": "/open/1.jpg"})
    opener = _opener()
    with pytest.raises(RobotsDisallowed):
        _get(opener, site.url("/moved.jpg"))
    assert _get(opener, site.url("/moved-ok.jpg")) == JPG
    assert "/private/1.jpg" not in site.requests and "/moved.jpg" in site.requests


def test_robots_txt_redirecting_inside_is_refused_by_the_guard(site: LoopbackServer) -> None:
    with LoopbackServer({"/robots.txt": Reply(body=b"User-agent: *\nAllow: /\n")}, host="127.0.0.1") as internal:
        for target in (internal.url("/robots.txt"), "http://169.254.169.254/latest/meta-data/"):
            site.routes["/robots.txt"] = Reply(302, headers={"Location": target})
            with pytest.raises(NetBlocked, match=r"^blocked: .*; robots.txt .* redirected there$"):
                _get(_opener(), site.url("/x/1.jpg"))
        assert internal.requests == [] and "/x/1.jpg" not in site.requests


def test_robots_txt_of_a_host_resolving_inside_is_refused_like_the_image(site: LoopbackServer) -> None:
    with LoopbackServer({"/robots.txt": Reply(body=b"")}, host="127.0.0.1") as internal:
        with pytest.raises(NetBlocked, match=r"^blocked: 127\.0\.0\.1 is loopback \(not in allow-list\); "
                                             r"resolved from localhost$"):
            _get(_opener(), f"http://localhost:{internal.port}/x.jpg")
        assert internal.requests == []


def test_tdm_reservation_header(site: LoopbackServer) -> None:
    site.routes["/reserved.jpg"] = Reply(body=JPG, headers={"tdm-reservation": "1"})
    site.routes["/open.jpg"] = Reply(body=JPG, headers={"tdm-reservation": "0", "tdm-policy": "https://x/p"})
    opener = _opener()
    with pytest.raises(TdmReserved, match=r"^TDM reservation: .*/reserved\.jpg is served with tdm-reservation: 1$"):
        _get(opener, site.url("/reserved.jpg"))
    assert _get(opener, site.url("/open.jpg")) == JPG
    assert _get(_opener(tdm_reservation=False), site.url("/reserved.jpg")) == JPG


def test_switched_off_robots_txt_is_not_fetched(site: LoopbackServer) -> None:
    site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nDisallow: /\n")
    assert _get(_opener(robots_txt=False), site.url("/private/1.jpg")) == JPG
    assert "/robots.txt" not in site.requests


def test_user_agent_matches_img2dataset(site: LoopbackServer) -> None:
    _, stream, err = download_image((0, site.url("/x/1.jpg")), 5, "curation", None)
    assert err is None and stream is not None
    assert site.user_agents == [user_agent("curation")]


def test_switches_reach_the_config_from_plain_options() -> None:
    config, _ = download_options({"respect_robots_txt": False, "respect_tdm_reservation": False})
    assert config.consent_policy() is None
    config, _ = download_options({"respect_tdm_reservation": False, "user_agent_token": "MyBot"})
    policy = config.consent_policy()
    assert policy is not None and policy.robots_txt and not policy.tdm_reservation
    assert policy.user_agent == user_agent("MyBot") and "compatible; mybot;" in policy.user_agent
    assert DownloadConfig().respect_robots_txt and DownloadConfig().respect_tdm_reservation
    with pytest.raises(ValueError):
        DownloadConfig(robots_txt_max_bytes=0)


def test_switches_on_the_command_line_and_the_resource() -> None:
    from curation.cli import build_parser
    from resources.downloader import DownloaderResource

    args = build_parser().parse_args(["download", "p.parquet", "out", "--no-robots-txt", "--user-agent-token", "x"])
    assert (args.respect_robots_txt, args.respect_tdm_reservation, args.user_agent_token) == (False, None, "x")
    args = build_parser().parse_args(["download", "p.parquet", "out", "--no-tdm-reservation"])
    assert (args.respect_robots_txt, args.respect_tdm_reservation) == (None, False)
    options = DownloaderResource(respect_robots_txt=False).options()
    config, _ = download_options(options)
    assert not config.respect_robots_txt and config.respect_tdm_reservation
    assert DownloaderResource().options()["respect_robots_txt"] is True


# --- the consent web through img2dataset --------------------------------------------------------------

CONSENT_HOSTS = ("127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7")
CONSENT_REASONS = (R.REASON_ROBOTS_TXT, R.REASON_TDM_RESERVATION)


@dataclass
class ConsentRun:
    truth: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    result: DownloadResult
    out: Path
    robots_hits: Counter[str]
    image_hits: Counter[tuple[str, str]]


@pytest.fixture(scope="module")
def consent_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, SampleWebServer]]:
    root = tmp_path_factory.mktemp("consent-web")
    cfg = SampleWebConfig(seed=3, pages=24, segments=1, wat_files_per_segment=1, consent=True,
                          port=free_port(("127.0.0.1", "127.0.0.2", *CONSENT_HOSTS)), workers=1)
    generate_sample_web(root, cfg)
    with serve_sample_web(root) as server:
        yield root, server


def _download(root: Path, server: SampleWebServer, out: Path, truth: list[dict[str, Any]],
              **config: Any) -> ConsentRun:
    urls = [str(t["url"]) for t in truth]
    pairs = pa.table({R.UID: pa.array(range(len(urls)), pa.int64()), R.URL: urls,
                      R.TEXT: [str(t["caption"]) for t in truth]})
    before = Counter(server.hits)
    settings = {"image_size": 64, "threads": 16, "retries": 1, "number_sample_per_shard": 1000, **config}
    result = download_images(pairs, str(out), DownloadConfig(**settings), NetPolicy.with_loopback())
    hits = Counter(server.hits)
    hits.subtract(before)
    robots = Counter({h: n for (h, p), n in hits.items() if p == "/robots.txt" and n})
    images = Counter({k: n for k, n in hits.items() if k[1] != "/robots.txt" and n})
    return ConsentRun(truth, result.table.to_pylist(), result, out, robots, images)


@pytest.fixture(scope="module")
def consent_run(consent_web: tuple[Path, SampleWebServer], tmp_path_factory: pytest.TempPathFactory) -> ConsentRun:
    import pyarrow.parquet as pq

    root, server = consent_web
    truth = [t for t in pq.read_table(root / "truth.parquet").to_pylist() if t["extract"]]
    return _download(root, server, tmp_path_factory.mktemp("consent-downloads"), truth)


def _path(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return str(parts.hostname), parts.path + (f"?{parts.query}" if parts.query else "")


def test_every_planted_refusal_is_blocked_with_its_reason(consent_run: ConsentRun) -> None:
    planted = 0
    for t, row in zip(consent_run.truth, consent_run.rows, strict=True):
        if t["http_behavior"] not in CONSENT_BEHAVIOURS:
            continue
        planted += 1
        if t["expect_status"] == "success":
            assert row[R.STATUS] == R.STATUS_SUCCESS, (t["http_behavior"], row[R.ERROR])
        else:
            assert (row[R.STATUS], row[R.REASON]) == (R.STATUS_BLOCKED, t["expect_reason"]), (t["http_behavior"], row)
    assert planted == 3 * len(CONSENT_BEHAVIOURS)


def test_nothing_else_is_blocked_by_consent(consent_run: ConsentRun) -> None:
    expected = {i for i, t in enumerate(consent_run.truth) if t["expect_reason"] in CONSENT_REASONS}
    got = {i for i, row in enumerate(consent_run.rows) if row[R.REASON] in CONSENT_REASONS}
    collateral, missed = got - expected, expected - got
    print(f"consent refusals: {len(got)} rows, {len(expected)} planted; collateral {len(collateral)}, "
          f"missed {len(missed)}, precision {len(got & expected) / max(1, len(got)):.3f}, "
          f"by reason {Counter(consent_run.rows[i][R.REASON] for i in got)}")
    assert not collateral and not missed and len(expected) == 18
    # the rest of the web still gets what its truth says (hostile behaviours included)
    for t, row in zip(consent_run.truth, consent_run.rows, strict=True):
        if t["http_behavior"] not in CONSENT_BEHAVIOURS:
            assert (row[R.STATUS] == R.STATUS_SUCCESS) == (t["expect_status"] == "success"), (t["http_behavior"], row)


def test_robots_txt_is_fetched_once_per_host(consent_run: ConsentRun) -> None:
    hosts = {str(urlsplit(str(t["url"])).hostname) for t in consent_run.truth}
    assert hosts == {"127.0.0.1", "127.0.0.2", *CONSENT_HOSTS}
    assert consent_run.robots_hits == Counter(dict.fromkeys(hosts, 1))


def test_refused_images_are_never_requested_and_never_stored(consent_run: ConsentRun) -> None:
    for t, row in zip(consent_run.truth, consent_run.rows, strict=True):
        if t["expect_reason"] == R.REASON_ROBOTS_TXT or t["http_behavior"] == "robots_redirect_ssrf":
            if t["http_behavior"] == "robots_redirect_disallowed":  # its first hop is allowed, the target not
                assert consent_run.image_hits[_path(str(t["url"]))] >= 1 and row[R.HTTP_STATUS] == 302
                assert row[R.FINAL_URL] is not None and "/private/moved/" in row[R.FINAL_URL]
                assert consent_run.image_hits[_path(row[R.FINAL_URL])] == 0
            else:
                assert consent_run.image_hits[_path(str(t["url"]))] == 0, t["url"]
        if t["http_behavior"] == "tdm_reserved":  # asked for, refused on its headers
            assert row[R.HTTP_STATUS] == 200 and row[R.SHA256] is None
    assert not any(h == "169.254.169.254" for h, _ in consent_run.image_hits)
    assert verify_shards(consent_run.result.table, str(consent_run.out / "shards")) == []


def test_switched_off_the_planted_images_download(consent_web: tuple[Path, SampleWebServer], consent_run: ConsentRun,
                                                  tmp_path: Path) -> None:
    root, server = consent_web
    planted = [t for t in consent_run.truth if t["http_behavior"] in CONSENT_BEHAVIOURS]
    run = _download(root, server, tmp_path / "off", planted, respect_robots_txt=False, respect_tdm_reservation=False)
    assert [r[R.STATUS] for r in run.rows] == [R.STATUS_SUCCESS] * len(planted), [r[R.ERROR] for r in run.rows]
    assert run.robots_hits == Counter()
