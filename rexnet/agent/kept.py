"""What the agent keeps of earlier launchers' requests (P11, 3): the same command line in
the same directory sends the same Exec bytes, so the message decoded for an earlier
launcher (its request the same object, whose START rexnet.client.cluster then makes only
once) serves the next, and so does the Cluster made for that request while its credential
and revocation list are still the ones loaded (their files are checked for each job, as
before). Bounded: at most EXECS_KEPT of each, no message longer than EXEC_KEPT_SIZE."""

from __future__ import annotations

from collections.abc import Callable

from rexnet.client.cluster import Cluster
from rexnet.protocol import agentwire
from rexnet.protocol.request import ExecRequest
from rexnet.security.credentials import Credential, CredentialError
from rexnet.security.revocation import RevokedFile

EXECS_KEPT = 64  # Exec messages kept decoded, by their bytes (and as many clusters)
EXEC_KEPT_SIZE = 16384  # a longer one is decoded each time


class Kept:
    """The agent's kept Exec messages and clusters; CREDENTIAL(path) and
    REVOCATIONS(option, keypath, app) load (or find) the files a cluster is made of."""

    def __init__(self, credential: Callable[[str], Credential],
                 revocations: Callable[[str, str, str], RevokedFile | None]) -> None:
        self.credential = credential
        self.revocations = revocations
        self.execs: dict[bytes, agentwire.Exec] = {}
        self.clusters: dict[int, tuple[ExecRequest, Cluster]] = {}  # by id(request)

    def exec_of(self, data: bytes) -> agentwire.Exec | None:
        """The Exec message whose bytes are DATA, if it was decoded before."""
        return self.execs.get(data)

    def keep_exec(self, data: bytes, message: agentwire.Exec) -> None:
        """Keep MESSAGE, decoded from DATA (its whole bytes), among the last EXECS_KEPT."""
        if len(data) <= EXEC_KEPT_SIZE:
            if len(self.execs) >= EXECS_KEPT:
                del self.execs[next(iter(self.execs))]
            self.execs[data] = message

    def cluster(self, request: ExecRequest) -> Cluster:
        """REQUEST's Cluster (RequestError as Cluster.for_request says it): the one made
        for the same request object while its credential and revocation list are still
        the ones loaded."""
        kept = self.clusters.get(id(request))
        if kept is not None and kept[0] is request:
            cluster = kept[1]
            try:
                loaded = self.credential(request.keypath)
                fresh = loaded is cluster.credential and self.revocations(
                    request.revoked, request.keypath, loaded.app) is cluster.revoked
            except CredentialError:
                fresh = False  # for_request says why
            if fresh:
                return cluster
        cluster = Cluster.for_request(request, self.credential, self.revocations)
        if len(self.clusters) >= EXECS_KEPT:
            self.clusters.clear()
        self.clusters[id(request)] = (request, cluster)
        return cluster
