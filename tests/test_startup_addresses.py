"""The start-up probe of the listen addresses (``startup.check_addresses``) and the listeners
agree: the probe checks every address a listen host resolves to (as ``create_server`` binds
every one), and ``:PORT`` means ``0.0.0.0:PORT`` for both (the settings' reading), so a port
that is free where the gateway will listen is never refused, and one that is taken anywhere it
will listen is refused before any state exists."""
from __future__ import annotations

import socket

import pytest

from gateway.startup import StartupError, check_addresses
from tests.gateway_harness import free_port
from tests.proxy_support import Gateway, make_settings


def _ipv6_only_listener() -> socket.socket:
    taken = socket.socket(socket.AF_INET6)
    taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    taken.bind(("::1", 0))
    taken.listen()
    return taken


def test_every_address_of_a_listen_host_is_probed(tmp_path, monkeypatch):
    """A host name with an IPv4 and an IPv6 address, the port taken on IPv6 only: refused,
    naming the address (the probe used to bind only the first address)."""
    with _ipv6_only_listener() as taken:
        port = taken.getsockname()[1]
        real = socket.getaddrinfo

        def resolve(host, *args, **kwargs):
            if host == "dual-stack.test":                # a name with both kinds of address
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
                        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))]
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", resolve)
        settings = make_settings(tmp_path, overrides={"server": {
            "listen": f"dual-stack.test:{port}", "admin_listen": f"127.0.0.1:{free_port()}"}})
        with pytest.raises(StartupError) as caught:
            check_addresses(settings)
    message = str(caught.value)
    assert f"server.listen 'dual-stack.test:{port}'" in message and " on ::1: " in message
    assert "in use" in message and "another process listens there" in message


async def test_an_empty_listen_host_is_ipv4_for_the_probe_and_the_listener(tmp_path):
    """``:PORT`` with the port taken on IPv6: the probe (0.0.0.0) passes, and so does the
    listener, which binds 0.0.0.0 too (it used to bind every address, IPv6 included, and fail
    after the start-up had created its state)."""
    with _ipv6_only_listener() as taken:
        port = taken.getsockname()[1]
        settings = make_settings(tmp_path, overrides={"server": {
            "listen": f":{port}", "admin_listen": f"127.0.0.1:{free_port()}"}})
        check_addresses(settings)
        gw = Gateway(settings)
        await gw.server.start()
        try:
            families = {s.family for s in gw.server._server.sockets}   # noqa: SLF001
            assert families == {socket.AF_INET}
            assert gw.server.address == ("0.0.0.0", port)
        finally:
            await gw.server.close()
