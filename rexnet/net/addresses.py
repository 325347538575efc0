"""This host's own addresses."""

from __future__ import annotations


def local_addresses() -> list[str]:
    """This host's own IPv4 addresses."""
    import socket

    import psutil

    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET]
