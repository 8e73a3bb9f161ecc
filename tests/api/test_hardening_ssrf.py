"""Webhook SSRF: callback URLs are resolved once per attempt, every address is checked (IPv6 forms
of private IPv4 space too), and the POST goes to exactly an address that was checked.

The deliveries here run `deliver_due` in this process on a real PostgreSQL database, to real
local HTTP(S) listeners; the only thing faked is the network's name resolution (a resolver that
answers differently the second time, as a DNS rebinding attacker's server does).
"""

from __future__ import annotations

import errno
import http.server
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.api_store import add_delivery, create_key, deliveries_for, new_id
from models.db import open_database, session_factory, upgrade
from models.settings import Settings
from models.store import utcnow
from models.tables import ApiBatch, WebhookDelivery
from producer.api.checks import check_callback_url, first_private, is_public
from producer.api.errors import ApiError
from producer.api.webhooks import deliver_due, post_pinned
from tests.api.conftest import ApiServer, Key, Receiver

PUBLIC = "93.184.215.14"  # a global address (never reached: see `rebinding_network`)


# --- the address classifier -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "::127.0.0.1",  # IPv4-compatible (is_global says True)
        "::10.1.2.3",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1 (is_global says True)
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254, the cloud metadata service
        "64:ff9b:1::a00:1",  # local-use NAT64 (RFC 8215) of 10.0.0.1
        "2002:7f00:1::",  # 6to4 of 127.0.0.1 (is_global says True)
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "2001:0:808:808::80ff:fffe",  # Teredo, client 127.0.0.1 (server 8.8.8.8)
        "2001:0:7f00:1::f7f7:f7f7",  # Teredo, server 127.0.0.1 (client 8.8.8.8)
        "127.0.0.1",
        "10.1.2.3",
        "169.254.169.254",
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",  # multicast (is_global says True)
        "::1",
        "::",
        "fe80::1%eth0",
        "fc00::1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public(address)
    assert first_private([PUBLIC, address]) == address.split("%")[0]
    host = f"[{address.split('%')[0]}]" if ":" in address else address
    with pytest.raises(ApiError) as refused:
        check_callback_url(f"http://{host}:9/hook")
    assert refused.value.param == "callback_url" and "points at a private or local address" in refused.value.message


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8"]
)
def test_public_addresses_and_ipv6_forms_of_public_ipv4_pass(address: str) -> None:
    assert is_public(address)
    assert first_private([address, PUBLIC]) is None


def test_a_callback_name_must_resolve_at_creation() -> None:
    def nothing(host: str, port: int | None) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    for allow_private in (False, True):
        with pytest.raises(ApiError) as refused:
            check_callback_url("https://hooks.sumfleet.test/x", "metadata.callback_url", allow_private=allow_private,
                               resolve=nothing)  # fmt: skip
        assert refused.value.status == 400 and refused.value.param == "metadata.callback_url"
        assert refused.value.message == (
            "metadata.callback_url 'https://hooks.sumfleet.test/x': the host name 'hooks.sumfleet.test' does not "
            "resolve (Name or service not known); webhooks need a name that resolves when the batch is created"
        )
    # any one private address among the answers is enough to refuse
    with pytest.raises(ApiError, match=r"private or local address \(::ffff:127\.0\.0\.1\)"):
        check_callback_url("http://hooks.sumfleet.test/x", resolve=lambda host, port: [PUBLIC, "::ffff:127.0.0.1"])
    assert check_callback_url("http://hooks.sumfleet.test/x", resolve=lambda host, port: [PUBLIC]) is not None


@pytest.mark.services
def test_the_api_refuses_a_callback_url_that_does_not_resolve(api: ApiServer, key: Key) -> None:
    with httpx.Client(base_url=api.url, headers=key.headers, timeout=30) as http:
        refused = http.post(
            "/api/v1/batches",
            json={"documents": ["One. Two."], "model": "lead", "callback_url": "http://no-such-host.invalid/hook"},
        )
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("callback_url", "invalid_value")
        assert "the host name 'no-such-host.invalid' does not resolve" in error["message"]
        assert http.get("/api/v1/batches").json()["data"] == []  # nothing was created


# --- deliveries -----------------------------------------------------------------------------------


@pytest.fixture
def owe(own_database: str) -> Iterator[Callable[[str], str]]:
    """Make a key, an ended batch and a webhook delivery owed to `url` in a database of the test's
    own, as the API does when a batch ends; returns the delivery's id."""
    engine = open_database(own_database)
    upgrade(engine)
    sessions = session_factory(engine)

    def make(url: str) -> str:
        with sessions.begin() as session:
            key = create_key(session, "ssrf")
            batch = ApiBatch(id=new_id("batch_"), kind="openai", owner=key.id, status="failed", created_at=utcnow())
            session.add(batch)
            session.flush()
            payload = f'{{"id":"{batch.id}","object":"batch","status":"failed"}}'
            delivery = add_delivery(
                session, api_batch_id=batch.id, owner=key.id, url=url, event="batch.failed", payload=payload
            )
            return delivery.id

    yield make
    engine.dispose()


def _delivery(settings: Settings, delivery_id: str) -> WebhookDelivery:
    engine = open_database(settings.database_url)
    try:
        with session_factory(engine)() as session:
            delivery = session.get(WebhookDelivery, delivery_id)
            assert delivery is not None
            assert [d.id for d in deliveries_for(session, delivery.api_batch_id)] == [delivery_id]
            return delivery
    finally:
        engine.dispose()


REBIND = "rebind.sumfleet.test"


@pytest.fixture
def rebinding_network(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The network as an attacker's DNS makes it: REBIND resolves to PUBLIC the first time and to
    127.0.0.1 after that; PUBLIC cannot be reached from here (no route), so nothing leaves this
    machine. Every name asked for and every address connected to is recorded."""
    real = socket.getaddrinfo
    seen: dict[str, list[str]] = {"answers": [], "connects": []}

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == REBIND:
            address = PUBLIC if not seen["answers"] else "127.0.0.1"
            seen["answers"].append(address)
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port or 0))]
        if host == PUBLIC:
            seen["connects"].append(host)
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return seen


@pytest.mark.services
def test_a_name_that_rebinds_to_localhost_gets_nothing(
    own_database: str, owe: Callable[[str], str], rebinding_network: dict[str, list[str]], receivers
) -> None:
    """Checked as public, then resolved again by the HTTP client to 127.0.0.1: the signed POST must
    not reach the local listener. The attempt connects to the address it checked, once resolved."""
    receiver: Receiver = receivers()
    settings = Settings(database_url=own_database, api_webhook_private=False, api_webhook_timeout=5)
    delivery_id = owe(f"http://{REBIND}:{receiver.port}/steal")
    engine = open_database(own_database)
    try:
        assert deliver_due(session_factory(engine), settings) == 1
    finally:
        engine.dispose()
    assert receiver.received == []  # the local listener got nothing
    assert rebinding_network["answers"] == [PUBLIC]  # the name was resolved once
    assert rebinding_network["connects"] == [PUBLIC]  # and the connection went to the checked address
    delivery = _delivery(settings, delivery_id)
    assert delivery.state == "pending" and delivery.attempts == 1  # an unreachable receiver: retried later
    assert delivery.last_error is not None and delivery.last_error.startswith("ConnectError: ")
    assert delivery.last_error.endswith(f"(at {PUBLIC})")


@pytest.mark.services
def test_a_delivery_goes_to_the_checked_address_with_the_urls_host_header(
    own_database: str, owe: Callable[[str], str], receivers
) -> None:
    """A name only the resolver knows: the POST arrives at the address it gave, with the URL's host
    in the Host header (nothing else resolves the name again)."""
    receiver: Receiver = receivers()
    asked: list[tuple[str, int | None]] = []

    def resolve(host: str, port: int | None) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.1"]

    settings = Settings(database_url=own_database, api_webhook_private=True, api_webhook_timeout=10)
    delivery_id = owe(f"http://hooks.sumfleet.test:{receiver.port}/pinned?x=1")
    engine = open_database(own_database)
    try:
        assert deliver_due(session_factory(engine), settings, resolve=resolve) == 1
    finally:
        engine.dispose()
    assert asked == [("hooks.sumfleet.test", receiver.port)]
    assert len(receiver.received) == 1
    arrived = receiver.received[0]
    assert arrived["path"] == "/pinned?x=1"
    assert arrived["headers"]["Host"] == f"hooks.sumfleet.test:{receiver.port}"
    assert arrived["headers"]["webhook-id"] == delivery_id
    delivery = _delivery(settings, delivery_id)
    assert (delivery.state, delivery.attempts, delivery.last_status) == ("delivered", 1, 200)


@pytest.mark.services
def test_a_delivery_whose_name_now_resolves_privately_is_refused_for_good(
    own_database: str, owe: Callable[[str], str], receivers
) -> None:
    receiver: Receiver = receivers()
    settings = Settings(database_url=own_database, api_webhook_private=False, api_webhook_timeout=5)
    delivery_id = owe(f"http://hooks.sumfleet.test:{receiver.port}/x")
    engine = open_database(own_database)
    try:
        deliver_due(session_factory(engine), settings, resolve=lambda host, port: [PUBLIC, "64:ff9b::7f00:1"])
    finally:
        engine.dispose()
    delivery = _delivery(settings, delivery_id)
    assert (delivery.state, delivery.attempts) == ("failed", 1)
    assert delivery.last_error == (
        f"refused: http://hooks.sumfleet.test:{receiver.port}/x resolves to the private or local address "
        "64:ff9b::7f00:1 (SUMFLEET_API_WEBHOOK_PRIVATE)"
    )
    assert receiver.received == []


# --- https: the name stays the TLS server name and the certificate's --------------------------


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


class TlsReceiver:
    """An HTTPS listener on 127.0.0.1 recording the TLS server name and Host header of each request."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.server_names: list[str | None] = []
        self.hosts: list[str | None] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.hosts.append(self.headers.get("Host"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)

        def server_name(_socket: Any, name: str | None, _context: Any) -> None:
            self.server_names.append(name)

        context.sni_callback = server_name
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_https_to_a_pinned_address_keeps_the_name_for_sni_and_the_certificate(tmp_path: Path) -> None:
    name = "hooks.sumfleet.test"
    cert, key = _certificate(tmp_path, name)
    receiver = TlsReceiver(cert, key)
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        status = post_pinned(
            f"https://{name}:{receiver.port}/tls", b"{}", {"Content-Type": "application/json"}, "127.0.0.1",
            timeout=10, verify=trust,
        )  # fmt: skip
        assert status == 204
        assert receiver.server_names == [name] and receiver.hosts == [f"{name}:{receiver.port}"]
        # the certificate is checked against the URL's name, not against the address connected to
        with pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|match"):
            post_pinned(
                f"https://other.sumfleet.test:{receiver.port}/tls", b"{}", {}, "127.0.0.1", timeout=10, verify=trust
            )
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # and trusted as usual
            post_pinned(f"https://{name}:{receiver.port}/tls", b"{}", {}, "127.0.0.1", timeout=10)
        assert receiver.hosts == [f"{name}:{receiver.port}"]
    finally:
        receiver.close()
