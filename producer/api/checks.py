"""Checks shared by the routes: storable text, the models the API accepts, callback URLs, list pages."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from models.errors import SumfleetError
from models.model_names import canonical_model, resolve_model
from models.settings import Settings
from producer.api.errors import ApiError

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL and lone surrogates: the database refuses them in text


def unstorable(text: str) -> str | None:
    """Why the database cannot store `text` (a NUL character, an unpaired surrogate), or None."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    what = "a NUL character" if found.group() == chr(0) else "an unpaired surrogate"
    return f"holds {what} (\\u{ord(found.group()):04x}) at position {found.start()}"


def storable_name(name: str) -> str:
    """A file name the database can store: NULs and lone surrogates become U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", name)


def accepted_models(settings: Settings) -> list[str]:
    """SUMFLEET_API_MODELS (comma-separated), or else the default model and `lead`.

    A list, not any name: a model name is also a path or a plugin module, which a network
    client must not be able to probe or import.
    """
    if settings.api_models:
        names = [canonical_model(n) for n in settings.api_models.split(",") if n.strip()]
    else:
        names = [canonical_model(settings.model), "lead"]
    return list(dict.fromkeys(names))


def model_problem(name: str, settings: Settings, accepted: list[str]) -> str | None:
    """Why `name` cannot be used here, or None."""
    model = canonical_model(name)
    if model not in accepted:
        return f"model {name!r} is not served here; the models are: {', '.join(accepted)}"
    try:
        resolve_model(model, settings, need_files=False)
    except SumfleetError as error:
        return str(error)
    return None


def check_model(name: str | None, settings: Settings, accepted: list[str], param: str = "model") -> str:
    """The canonical model for a request (the server's default when None), or 400."""
    model = name if name is not None else settings.model
    problem = model_problem(model, settings, accepted)
    if problem is not None:
        raise ApiError(400, problem, param=param, code="model_not_found")
    return canonical_model(model)


def private_address(host: str) -> str | None:
    """The first address `host` resolves to that is not public (loopback, private, link-local,
    reserved, ...), or None; a host that does not resolve (now) gives None too."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not address.is_global:
            return str(address)
    return None


def check_callback_url(url: str | None, param: str = "callback_url", *, allow_private: bool = False) -> str | None:
    """An absolute http(s) URL of a public address (unless `allow_private`), or 400.

    Webhooks are sent from inside the deployment, so by default they may not reach its own
    private network (the address is checked again before every delivery).
    """
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        parts = urlsplit("")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or len(url) > 2048
        or any(c.isspace() or not c.isprintable() for c in url)
    ):
        raise ApiError(
            400,
            f"{param} must be an absolute http:// or https:// URL (at most 2048 characters), got {url!r}",
            param=param,
            code="invalid_value",
        )
    if not allow_private and (address := private_address(parts.hostname)) is not None:
        raise ApiError(
            400,
            f"{param} {url!r} points at a private or local address ({address}); webhooks go to public "
            "addresses only unless SUMFLEET_API_WEBHOOK_PRIVATE=1",
            param=param,
            code="invalid_value",
        )
    return url


def page(items: list[Any], has_more: bool) -> dict[str, Any]:
    """OpenAI's list object."""
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


def unknown_cursor(after: str) -> ApiError:
    return ApiError(400, f"after: no object {after!r} of this key to list after", param="after", code="invalid_cursor")


def listed(
    found: tuple[list[Any], bool] | None, after: str | None, render: Callable[[Any], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """OpenAI's list object of a page (its items made by `render`), or 400 when `after` named no object of the key."""
    if found is None:
        raise unknown_cursor(after or "")
    items, more = found
    return page([render(item) for item in items] if render is not None else items, more)
