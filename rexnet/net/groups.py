"""$GROUP and --join for the daemons: the multicast groups a socket joins.

Clients announce to $GROUP when no --announce is given (rexnet.protocol.request); the
worker, crat and cproxy read it the same way: when they are given no --join, they join
$GROUP if it is a multicast group (a broadcast $GROUP needs no joining: a socket on
0.0.0.0 hears it).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Mapping, Sequence


def multicast_group(text: str) -> str:
    """TEXT ("ADDR" or "ADDR:PORT") as a multicast address; ValueError if it is none."""
    host = text.strip()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is no IP address") from None
    if not address.is_multicast:
        raise ValueError(f"{text} is not a multicast group (224.0.0.0/4 or ff00::/8)")
    return str(address)


def env_groups(environ: Mapping[str, str] = os.environ) -> list[str]:
    """[$GROUP's address] when $GROUP names a multicast group, else []."""
    try:
        return [multicast_group(environ.get("GROUP", ""))] if environ.get("GROUP") else []
    except ValueError:
        return []


def joined(given: Sequence[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """The groups to join: the --join GIVEN (checked: ValueError), else $GROUP's."""
    return [multicast_group(g) for g in given] if given else env_groups(environ)


def join(sock: socket.socket, group: str) -> None:
    """Make SOCK (bound UDP, of the group's family) a member of GROUP on the interface the
    kernel routes it to; OSError if it cannot."""
    if ":" in group:
        mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", 0)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
    else:
        mreq = socket.inet_aton(group) + struct.pack("=I", socket.INADDR_ANY)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
