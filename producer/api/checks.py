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


FILE_TTL_MIN = 3600  # seconds: the shortest `expires_after` OpenAI accepts (an hour)
FILE_TTL_MAX = 2_592_000  # seconds: the longest (30 days)


def expires_after(value: object, param: str = "expires_after") -> int:
    """The seconds of OpenAI's `{"anchor": "created_at", "seconds": N}` (N from an hour to 30 days), or 400."""
    if not isinstance(value, dict):
        raise ApiError(
            400,
            f'{param} must be an object {{"anchor": "created_at", "seconds": N}}, got {type(value).__name__}',
            param=param,
            code="invalid_value",
        )
    anchor, seconds = value.get("anchor"), value.get("seconds")
    if anchor != "created_at":
        got = "it is missing" if anchor is None else f"got {anchor!r}"
        raise ApiError(
            400, f'{param}.anchor must be "created_at", {got}', param=f"{param}.anchor", code="invalid_value"
        )
    if isinstance(seconds, str) and re.fullmatch(r"[0-9]{1,12}", seconds.strip()):
        seconds = int(seconds)  # a multipart form sends it as text
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not FILE_TTL_MIN <= seconds <= FILE_TTL_MAX:
        got = "it is missing" if seconds is None else f"got {seconds!r}"
        raise ApiError(
            400,
            f"{param}.seconds must be a whole number of seconds from {FILE_TTL_MIN} (an hour) to {FILE_TTL_MAX} "
            f"(30 days), {got}",
            param=f"{param}.seconds",
            code="invalid_value",
        )
    return seconds


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


# A resolver: the addresses (text, an IPv6 one maybe with a %scope) a host name has for TCP on a
# port, or OSError when it has none. `resolve_host` asks the system; a test may pass its own.
Resolver = Callable[[str, int | None], list[str]]

_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # ::a.b.c.d, deprecated (RFC 4291)
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))  # RFC 6052, RFC 8215


def resolve_host(host: str, port: int | None = None) -> list[str]:
    """Every address `host` resolves to for TCP now (the system resolver), in its order; OSError if none."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except UnicodeError as error:  # a name IDNA cannot encode
        raise OSError(f"not a resolvable name ({error})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise OSError("no address")
    return addresses


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries and that traffic to it may reach: IPv4-mapped
    (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::a.b.c.d), 6to4 (2002:AABB:CCDD::)
    and Teredo (2001:0:SERVER::CLIENT, both). Empty for any other IPv6 address."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address in _IPV4_COMPATIBLE or any(address in network for network in _NAT64):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    return found


def is_public(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether webhooks may go to `address` by default: a global unicast address, and for an IPv6
    address that embeds IPv4 addresses (see `embedded_ipv4`) every one of those too, whatever
    `ipaddress`'s `is_global` says of the IPv6 form."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%", 1)[0])
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return all(is_public(inner) for inner in embedded_ipv4(address))
    return True


def first_private(addresses: list[str]) -> str | None:
    """The first of `addresses` that is not public (loopback, private, link-local, reserved, an IPv6
    form of such an IPv4 address, ...), or None when all are public."""
    for address in addresses:
        try:
            public = is_public(address)
        except ValueError:  # not an IP address at all: never a place to send to
            return address
        if not public:
            return address.split("%", 1)[0]
    return None


def check_callback_url(
    url: str | None,
    param: str = "callback_url",
    *,
    allow_private: bool = False,
    resolve: Resolver = resolve_host,
) -> str | None:
    """An absolute http(s) URL whose host name resolves, to public addresses only (unless
    `allow_private`), or 400.

    Webhooks are sent from inside the deployment, so by default they may not reach its own
    private network. The name is resolved again before every delivery, and each delivery goes
    to an address checked then (see `producer.api.webhooks`).
    """
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = urlsplit(""), None
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
    try:
        addresses = resolve(parts.hostname, port)
    except OSError as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise ApiError(
            400,
            f"{param} {url!r}: the host name {parts.hostname!r} does not resolve ({reason}); "
            "webhooks need a name that resolves when the batch is created",
            param=param,
            code="invalid_value",
        ) from None
    if not allow_private and (address := first_private(addresses)) is not None:
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
