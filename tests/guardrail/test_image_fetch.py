"""Image URLs are fetched under the operator's policy, against real servers on loopback:
refused addresses are checked on the resolved address, redirects are checked again, and size
and time are bounded; every outcome is counted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from guardrail.config import ConfigError, load_settings
from guardrail.demo.background_server import BackgroundServer
from guardrail.service.image_fetch import ImageFetcher, ImageFetchError, parse_allowed_host

PNG = (Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png").read_bytes()


class Host:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.url = ""

    def app(self) -> Starlette:
        async def image(request: Request) -> Response:
            self.requests.append((request.url.path, request.headers.get("host", "")))
            return Response(PNG, media_type="image/png")

        async def big(request: Request) -> Response:
            self.requests.append((request.url.path, ""))
            return Response(b"\x89PNG" + b"0" * 200_000, media_type="image/png")

        async def slow(request: Request) -> Response:
            self.requests.append((request.url.path, ""))
            await asyncio.sleep(3)
            return Response(PNG, media_type="image/png")

        async def redirect(request: Request) -> Response:
            self.requests.append((request.url.path, ""))
            return RedirectResponse(request.query_params["to"], status_code=302)

        async def loop(request: Request) -> Response:
            self.requests.append((request.url.path, ""))
            return RedirectResponse("/loop", status_code=302)

        return Starlette(
            routes=[
                Route("/image.png", image),
                Route("/big.png", big),
                Route("/slow.png", slow),
                Route("/redirect", redirect),
                Route("/loop", loop),
            ]
        )


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    server = Host()
    with BackgroundServer(server.app()) as url:
        server.url = url
        yield server


def fetcher(outcomes: list[str], **overrides: Any) -> ImageFetcher:
    options: dict[str, Any] = {
        "enabled": True,
        "allowed_hosts": ["127.0.0.1"],
        "max_bytes": 100_000,
        "timeout_seconds": 1.0,
        "max_redirects": 2,
        "count": outcomes.append,
    }
    return ImageFetcher(**{**options, **overrides})


def refused(f: ImageFetcher, url: str) -> ImageFetchError:
    with pytest.raises(ImageFetchError) as caught:
        f.fetch(url)
    return caught.value


def test_an_allow_listed_loopback_host_is_fetched(host: Host) -> None:
    outcomes: list[str] = []
    assert fetcher(outcomes).fetch(f"{host.url}/image.png") == PNG
    assert outcomes == ["fetched"]
    assert host.requests[-1] == ("/image.png", host.url.removeprefix("http://"))


def test_refusals_never_reach_the_host(host: Host) -> None:
    before = len(host.requests)
    outcomes: list[str] = []
    cases = [
        (fetcher(outcomes, enabled=False), f"{host.url}/image.png", "disabled"),
        (fetcher(outcomes, allowed_hosts=[]), f"{host.url}/image.png", "blocked_address"),
        (fetcher(outcomes, allowed_hosts=["cdn.example.com"]), f"{host.url}/i.png", "not_allowed"),
        (fetcher(outcomes), "ftp://127.0.0.1/image.png", "bad_url"),
        (fetcher(outcomes), f"http://user:pw@{host.url[7:]}/image.png", "bad_url"),
        (fetcher(outcomes, allowed_hosts=[]), "http://169.254.169.254/latest/", "blocked_address"),
        (fetcher(outcomes, allowed_hosts=[]), "http://[::1]/image.png", "blocked_address"),
        (fetcher(outcomes, allowed_hosts=[]), "http://10.1.2.3/image.png", "blocked_address"),
    ]
    for f, url, outcome in cases:
        error = refused(f, url)
        assert error.outcome == outcome, url
        assert error.by_policy
    assert outcomes == [c[2] for c in cases]
    assert len(host.requests) == before


def test_a_name_is_checked_on_the_address_it_resolves_to(host: Host) -> None:
    outcomes: list[str] = []
    evil = fetcher(outcomes, allowed_hosts=[], resolver=lambda host, port: ["10.0.0.7"])
    error = refused(evil, "http://images.evil.test/a.png")
    assert error.outcome == "blocked_address" and "10.0.0.7" in str(error)
    # listed by a wildcard name, its loopback address is the operator's choice; the
    # connection goes to the checked address, with the name as the Host
    listed = fetcher(
        outcomes, allowed_hosts=["*.corp.test"], resolver=lambda host, port: ["127.0.0.1"]
    )
    port = host.url.rsplit(":", 1)[1]
    assert listed.fetch(f"http://images.corp.test:{port}/image.png") == PNG
    assert host.requests[-1] == ("/image.png", f"images.corp.test:{port}")
    assert outcomes == ["blocked_address", "fetched"]


def test_redirects_are_checked_again(host: Host) -> None:
    outcomes: list[str] = []
    f = fetcher(outcomes)
    assert f.fetch(f"{host.url}/redirect?to=/image.png") == PNG
    error = refused(f, f"{host.url}/redirect?to=http://169.254.169.254/latest/meta-data")
    assert error.outcome == "not_allowed"
    error = refused(fetcher(outcomes, allowed_hosts=["127.0.0.1", "localhost"]), f"{host.url}/loop")
    assert error.outcome == "too_many_redirects"
    assert outcomes == ["fetched", "not_allowed", "too_many_redirects"]


def test_size_and_time_are_bounded(host: Host) -> None:
    outcomes: list[str] = []
    assert refused(fetcher(outcomes), f"{host.url}/big.png").outcome == "too_large"
    assert refused(fetcher(outcomes), f"{host.url}/slow.png").outcome == "timeout"
    assert refused(fetcher(outcomes), f"{host.url}/missing.png").outcome == "http_error"
    assert outcomes == ["too_large", "timeout", "http_error"]
    assert not any(ImageFetchError(o, "").by_policy for o in outcomes)


def test_allow_list_entries_are_validated(tmp_path: Path) -> None:
    assert parse_allowed_host("10.0.0.0/8").network is not None
    assert parse_allowed_host("*.example.com").matches_name("cdn.example.com")
    assert not parse_allowed_host("*.example.com").matches_name("example.com.evil.test")
    for bad in ("", "http://x", "a b", "*."):
        with pytest.raises(ValueError, match="image_url_allowed_hosts"):
            parse_allowed_host(bad)
    with pytest.raises(ConfigError, match="image_url_allowed_hosts"):
        load_settings(
            environ={},
            database_url=f"sqlite:///{tmp_path / 'g.db'}",
            image_url_allowed_hosts=["http://cdn.example.com/"],
        )


def test_the_urls_of_one_sample_share_one_deadline(host: Host) -> None:
    """The tee fetches a sample's image URLs by one deadline: a URL that would answer within
    the fetcher's own timeout (3 s of 10) is cut at the shared deadline, and one whose turn
    comes after it is never requested."""
    outcomes: list[str] = []
    f = fetcher(outcomes, timeout_seconds=10.0)
    with pytest.raises(ImageFetchError) as caught:
        f.fetch(f"{host.url}/slow.png", deadline=time.monotonic() + 0.3)
    assert caught.value.outcome == "timeout"
    before = len(host.requests)
    with pytest.raises(ImageFetchError) as caught:
        f.fetch(f"{host.url}/image.png", deadline=time.monotonic() - 0.1)
    assert caught.value.outcome == "timeout" and len(host.requests) == before
    assert f.fetch(f"{host.url}/image.png", deadline=time.monotonic() + 5) == PNG
    assert outcomes == ["timeout", "timeout", "fetched"]
