"""Consent planting for the sample web (`SampleWebConfig(consent=True)`; off by default): robots.txt files
on extra loopback hosts and images served with the TDMRep header, with the truth a crawler honouring
them must reach (`expect_reason` robots_txt / tdm_reservation, or ssrf_blocked for a robots.txt that
redirects inside).

The consent hosts (`SampleWebConfig.consent_hosts`, in `CONSENT_ROLES` order) and what their robots.txt
says:

- robots_star: a 200 for `*`: Disallow /private/, Allow /private/open/ (longer, so it wins), Disallow
  `/*.raw$` (the `$` leaves `….raw?size=full` allowed);
- robots_agent: our product token alone is disallowed everywhere (other groups allow or name others);
- robots_unreachable: a 503 (RFC 9309: the whole host is disallowed);
- robots_garbage: a 200 of binary noise (no rules: everything allowed); it also serves a redirect into
  robots_star's /private/ (the hop is disallowed);
- robots_ssrf: a 302 to the cloud metadata address (the SSRF guard refuses it; the images are blocked).

TDM images stay on the first ordinary host (no robots.txt there: a 404, everything allowed). The images
moved here are ordinary single-occurrence "ok" links, so every other truth stays as it was.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from curation.sample.web import ImageSpec, Link, SampleWebConfig

CONSENT_ROLES = ("robots_star", "robots_agent", "robots_unreachable", "robots_garbage", "robots_ssrf")
CONSENT_IMAGES_PER_CASE = 3
METADATA_ROBOTS = "http://169.254.169.254/latest/meta-data/robots.txt"
REDIRECT_TARGET = "/private/moved/{name}"  # on robots_star: where robots_redirect_disallowed points

# behaviour -> (expected status, expected reason), like web.HTTP_BEHAVIOURS
CONSENT_BEHAVIOURS: dict[str, tuple[str, str | None]] = {
    "robots_disallowed": ("failed", "robots_txt"),
    "robots_allowed_subpath": ("success", None),
    "robots_disallowed_end": ("failed", "robots_txt"),
    "robots_allowed_query": ("success", None),
    "robots_allowed": ("success", None),
    "robots_agent_disallowed": ("failed", "robots_txt"),
    "robots_unreachable": ("failed", "robots_txt"),
    "robots_garbage": ("success", None),
    "robots_redirect_disallowed": ("failed", "robots_txt"),
    "robots_redirect_ssrf": ("failed", "ssrf_blocked"),
    "tdm_reserved": ("failed", "tdm_reservation"),
    "tdm_not_reserved": ("success", None),
}
# behaviour -> (host role, "" for the first ordinary host; path template)
CONSENT_PATHS: dict[str, tuple[str, str]] = {
    "robots_disallowed": ("robots_star", "/private/{name}"),
    "robots_allowed_subpath": ("robots_star", "/private/open/{name}"),
    "robots_disallowed_end": ("robots_star", "/gallery/{stem}.raw"),
    "robots_allowed_query": ("robots_star", "/gallery/{stem}.raw?size=full"),
    "robots_allowed": ("robots_star", "/gallery/{name}"),
    "robots_agent_disallowed": ("robots_agent", "/media/{name}"),
    "robots_unreachable": ("robots_unreachable", "/media/{name}"),
    "robots_garbage": ("robots_garbage", "/media/{name}"),
    "robots_redirect_disallowed": ("robots_garbage", "/moved/{name}"),
    "robots_redirect_ssrf": ("robots_ssrf", "/media/{name}"),
    "tdm_reserved": ("", "/tdm/{name}"),
    "tdm_not_reserved": ("", "/tdm-open/{name}"),
}
TDM_HEADERS = {"tdm_reserved": "1", "tdm_not_reserved": "0"}  # behaviour -> tdm-reservation header value


def robots_files(cfg: SampleWebConfig) -> dict[str, tuple[int, bytes, str | None]]:
    """Per consent host: (HTTP status, body, Location) of its /robots.txt."""
    hosts = dict(zip(CONSENT_ROLES, cfg.consent_hosts, strict=True))
    star = (f"# The sample web's consent host: rules for every crawler\nUser-agent: *\nDisallow: /private/\n"
            f"Allow: /private/open/\nDisallow: /*.raw$\n\nSitemap: http://{hosts['robots_star']}:{cfg.port}/sitemap.xml\n")
    agent = (f"User-agent: otherbot\nDisallow: /media/\n\nUser-agent: {cfg.consent_user_agent}\nDisallow: /\n\n"
             "User-agent: *\nAllow: /\n")
    noise = np.random.default_rng([cfg.seed, 9309]).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    return {
        hosts["robots_star"]: (200, star.encode(), None),
        hosts["robots_agent"]: (200, agent.encode(), None),
        hosts["robots_unreachable"]: (503, b"Service Unavailable", None),
        hosts["robots_garbage"]: (200, b"\x89PNG\r\n\x1a\n\x00" + noise, None),
        hosts["robots_ssrf"]: (302, b"", METADATA_ROBOTS),
    }


def _eligible(pages: list[dict[str, Any]], specs: dict[str, ImageSpec]) -> list[Link]:
    """Links that can move host without touching other truth: "ok", linked once, no duplicates, not high-res."""
    uses = Counter(id(lk.truth) for pg in pages for lk in pg["links"] if lk.truth)
    return [lk for pg in pages for lk in pg["links"]
            if lk.truth and uses[id(lk.truth)] == 1 and lk.truth["http_behavior"] == "ok"
            and lk.truth["dup_group"] is None and specs[lk.truth["image_id"]].width < 1024]


def plant_consent(pages: list[dict[str, Any]], specs: dict[str, ImageSpec], cfg: SampleWebConfig) -> dict[str, str]:
    """Move CONSENT_IMAGES_PER_CASE links per consent behaviour to their consent URLs (spelled absolute);
    return the planted redirects (URL -> Location). Draws from its own seeded RNG, not the generator's."""
    hosts = dict(zip(CONSENT_ROLES, cfg.consent_hosts, strict=True))
    eligible = _eligible(pages, specs)
    need = CONSENT_IMAGES_PER_CASE * len(CONSENT_PATHS)
    if len(eligible) < need:
        raise ValueError(f"consent planting needs {need} ordinary image links, the web has {len(eligible)}: "
                         "generate more pages")
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(eligible))
    redirects: dict[str, str] = {}
    for i, behaviour in enumerate(b for b in CONSENT_PATHS for _ in range(CONSENT_IMAGES_PER_CASE)):
        link = eligible[int(order[i])]
        spec = specs[link.truth["image_id"]]
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[spec.fmt]
        role, template = CONSENT_PATHS[behaviour]
        authority = f"{hosts[role]}:{cfg.port}" if role else cfg.authority(0)
        name = f"{spec.image_id}.{ext}"
        link.url = f"http://{authority}{template.format(name=name, stem=spec.image_id)}"
        link.src, link.link_form = link.url, "absolute"
        link.truth["http_behavior"] = behaviour
        if behaviour == "robots_redirect_disallowed":
            redirects[link.url] = (f"http://{hosts['robots_star']}:{cfg.port}"
                                   f"{REDIRECT_TARGET.format(name=name)}")
    return redirects


def write_robots(out: Path, cfg: SampleWebConfig) -> dict[str, dict[str, Any]]:
    """Write each consent host's robots.txt body under web/<host>/; return the manifest's `robots` entry."""
    entries: dict[str, dict[str, Any]] = {}
    for host, (status, body, location) in robots_files(cfg).items():
        rel = f"web/{host}/robots.txt"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(body)
        entries[host] = {"status": status, "file": rel, "location": location}
    return entries
