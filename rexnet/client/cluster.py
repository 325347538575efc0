"""Cluster: where a client's jobs go and whom they trust, set up once and shared.

One Cluster value (credential, announce targets, alert targets, revocation list, timeout)
serves every job of `rexnet exec` (standalone or in the agent), rexnet parallel, the
Executor and the Python API; Cluster.job makes the ClientJob of one request on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from rexnet.client.job import ClientJob
from rexnet.client.streams import JobStreams, StdioStreams
from rexnet.client.warm import WarmPool
from rexnet.net.alerts import CRAT_PORT, AlertSender, crat_targets
from rexnet.net.announce import parse_target
from rexnet.protocol import exitcodes, wire
from rexnet.protocol.request import (
    DEFAULT_TIMEOUT,
    ExecRequest,
    RequestError,
    announce_or_default,
    check_timeout,
)
from rexnet.security.credentials import Credential, CredentialCache, CredentialError
from rexnet.security.revocation import open_list
from rexnet.security.tls import Revocations

Target = str | tuple[str, int]
"""An "ADDR[:PORT]" text (as --announce and --alerts take) or a (host, port) pair."""
Address = tuple[str, int]


def parse_targets(given: Sequence[Target], default_port: int | None = None) -> tuple[Address, ...]:
    """GIVEN as (host, port) pairs; ValueError for a bad address."""
    def one(t: Target) -> Address:
        if isinstance(t, tuple):
            return t[0], int(t[1])
        return parse_target(t) if default_port is None else parse_target(t, default_port)

    return tuple(one(t) for t in given)


def announce_addresses(texts: Sequence[str]) -> tuple[Address, ...]:
    """A command line's --announce targets (none: $GROUP, else the broadcast address);
    RequestError for a bad one."""
    try:
        return parse_targets(announce_or_default(tuple(texts)))
    except ValueError as e:
        raise RequestError(f"--announce: {e}", exitcodes.USAGE) from None


_credentials = CredentialCache("client")


def client_credential(credential: Credential | str | os.PathLike[str]) -> Credential:
    """A client credential, or the path of one to load (CredentialError if it is refused);
    a file loaded before is read again only if it changed."""
    if isinstance(credential, Credential):
        return credential
    return _credentials.load(credential)


def load_revocations(option: str, keypath: str, app: str) -> Revocations | None:
    """--revoked OPTION, else APP.revoked beside KEYPATH if there is one (CredentialError
    if the list cannot be read)."""
    return open_list(option or None, Path(keypath), app)


@dataclass(frozen=True)
class Cluster:
    """A client's view of its cluster: its CREDENTIAL, where it announces jobs (TARGETS)
    and sends alerts (ALERT_TARGETS), the workers it refuses (REVOKED) and how long a job
    looks for a worker (TIMEOUT)."""

    credential: Credential
    targets: tuple[Address, ...]
    alert_targets: tuple[Address, ...]
    revoked: Revocations | None = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def build(cls, credential: Credential | str | os.PathLike[str],
              announce: Sequence[Target] | None = None,
              alerts: Sequence[Target] | None = None, timeout: float = DEFAULT_TIMEOUT,
              revoked: Revocations | None = None) -> Cluster:
        """The Python API's cluster. CREDENTIAL is a client credential or its file;
        ANNOUNCE "ADDR[:PORT]" texts or pairs (none: $GROUP, else the broadcast address);
        ALERTS crat's addresses (None: the announce targets on crat's port; empty: none);
        REVOKED the workers to refuse (None: APP.revoked beside CREDENTIAL's file, if it
        is a file and there is one). ValueError for a bad address or timeout,
        CredentialError for a credential (or revocation list) that is refused."""
        announced = parse_targets(announce or announce_or_default(()))
        alert_to = (parse_targets(alerts, CRAT_PORT) if alerts is not None
                    else tuple(crat_targets(announced)))
        check_timeout(timeout, "timeout")
        loaded = client_credential(credential)
        if revoked is None and not isinstance(credential, Credential):
            revoked = load_revocations("", os.fspath(credential), loaded.app)
        return cls(loaded, announced, alert_to, revoked, timeout)

    @classmethod
    def for_request(
        cls, request: ExecRequest,
        credential: Callable[[str], Credential] = client_credential,
        revocations: Callable[[str, str, str], Revocations | None] = load_revocations,
    ) -> Cluster:
        """The cluster of a command line's REQUEST (in the launcher's agent, or standalone);
        CREDENTIAL(path) and REVOCATIONS(option, keypath, app) load them (the agent keeps
        them). RequestError with the message and exit status for the user."""
        announced = announce_addresses(request.announce)
        try:
            alert_to = parse_targets(request.alerts, CRAT_PORT) or tuple(crat_targets(announced))
        except ValueError as e:
            raise RequestError(f"--alerts: {e}", exitcodes.USAGE) from None
        path = request.keypath
        try:
            loaded = credential(path)
            revoked = revocations(request.revoked, path, loaded.app)
        except CredentialError as e:  # in the words of the path the user gave
            message = str(e).replace(path, request.keyfile) if request.keyfile else str(e)
            raise RequestError(message, exitcodes.CREDENTIAL) from None
        return cls(loaded, announced, alert_to, revoked, request.timeout)

    def job(self, reactor: Any, request: ExecRequest, streams: JobStreams | None = None, *,
            say: Callable[[str], None] = lambda message: None,
            pool: WarmPool | None = None, logger: Logger | None = None,
            on_started: Callable[[str, str], None] | None = None) -> ClientJob:
        """The ClientJob of REQUEST on this cluster (not started: call its run()). Its
        alerts go through POOL's shared sender if there is a pool, else its own. A job
        with files or detached gets FileStreams around STREAMS, and no warm channel
        (RequestError if a --put file cannot be read)."""
        start = _start_of(request, keep=pool is not None)
        if request.put or request.get or request.detach:  # never on a warm channel
            from rexnet.client.files import FileStreams

            pool = None
            streams = FileStreams(reactor, streams or StdioStreams(
                reactor, request.tty, dict(request.fds)), request)
            start = replace(start, put=streams.declared)
        alerts = (pool.alerts(self.credential, self.alert_targets) if pool is not None
                  else AlertSender(reactor, self.credential, self.alert_targets))
        return ClientJob(reactor, self.credential, self.targets, start, streams,
                         self.timeout, say=say, alerts=alerts, pool=pool, logger=logger,
                         revoked=self.revoked, on_started=on_started,
                         queue_timeout=request.queue_timeout or None)


STARTS_KEPT = 64  # START frames kept, of the requests jobs ran last

_starts: dict[tuple[int, bool], tuple[ExecRequest, wire.Start]] = {}


def _start_of(request: ExecRequest, keep: bool) -> wire.Start:
    """REQUEST's START frame (with KEEP: asking for a warm channel), made once per request
    object while it is among the last STARTS_KEPT (an Executor runs one request many
    times; frames are frozen)."""
    kept = _starts.get((id(request), keep))
    if kept is not None and kept[0] is request:
        return kept[1]
    start = request.start()
    if keep:
        start = replace(start, keep=True)
    if len(_starts) >= STARTS_KEPT:
        _starts.clear()
    _starts[id(request), keep] = (request, start)
    return start
