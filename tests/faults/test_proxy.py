"""The outage proxy the fault tests rely on: a cut leaves no connection alive."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.faults.proxy import Proxy


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    with contextlib.suppress(OSError), conn:
        while data := conn.recv(1024):
            conn.sendall(data)


def _alive(client: socket.socket) -> bool:
    """Whether bytes sent through `client` come back (the connection reaches the echo server)."""
    client.settimeout(5)
    try:
        client.sendall(b"ping")
        return client.recv(1024) == b"ping"
    except OSError:
        return False


def test_a_cut_drops_open_connections_and_refuses_new_ones() -> None:
    server, port = _echo_server()
    proxy = Proxy(("127.0.0.1", port))
    proxy.start()
    try:
        before = socket.create_connection(("127.0.0.1", proxy.port))
        assert _alive(before)
        proxy.cut()
        assert not _alive(before)
        try:
            refused = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        except OSError:
            pass
        else:
            assert not _alive(refused)
        proxy.start()
        after = socket.create_connection(("127.0.0.1", proxy.port))
        assert _alive(after)
    finally:
        proxy.cut()
        server.close()


def test_a_connection_being_opened_during_a_cut_does_not_survive_it() -> None:
    server, port = _echo_server()
    opening, release = threading.Event(), threading.Event()

    class SlowProxy(Proxy):
        def _connect(self) -> socket.socket:  # the target answers only once the test has cut
            upstream = super()._connect()
            opening.set()
            release.wait(10)
            return upstream

    proxy = SlowProxy(("127.0.0.1", port))
    proxy.start()
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port))
        assert opening.wait(10)
        proxy.cut()
        release.set()
        assert not _alive(client)
        assert proxy.accepted == 0
    finally:
        proxy.cut()
        server.close()
