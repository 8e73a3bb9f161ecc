"""/docs and /redoc work without internet: every script and stylesheet they load is served here."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.api.conftest import ApiServer

pytestmark = pytest.mark.services


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(api: ApiServer, page: str) -> None:
    html = httpx.get(f"{api.url}{page}").text
    loaded = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', html)
    scripts = re.findall(r'<script src=["\']([^"\']+)["\']', html)
    assert scripts, html  # the page does load a script
    assert "openapi.json" in html
    for url in loaded:
        assert not url.startswith(("http://", "https://", "//")), f"{page} loads {url} from the network"
        asset = httpx.get(f"{api.url}{url}")  # no key: the pages and their assets are open
        assert asset.status_code == 200 and len(asset.content) > 1000, url
