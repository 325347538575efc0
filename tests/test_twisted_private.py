"""Twisted's private APIs that rexnet relies on: each still exists, with the shape rexnet
uses, and each is used by one module only (so a Twisted release that removes one breaks
one module, and this test names the API to replace)."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# private API: (the one module that may use it, why)
PRIVATE: dict[str, tuple[str, str]] = {
    "twisted.internet.process.Process._trySpawnInsteadOfFork":
        ("rexnet/worker/spawn.py", "posix_spawn for jobs instead of fork"),
    "twisted.internet.process._listOpenFDs":
        ("rexnet/worker/spawn.py", "the descriptors posix_spawn must close in the child"),
    "twisted.internet.process._getFileActions":
        ("rexnet/worker/spawn.py", "posix_spawn's file actions for childFDs"),
    "twisted.internet.process._PS_CLOSE":
        ("rexnet/worker/spawn.py", "posix_spawn's close action"),
    "twisted.internet.process._PS_DUP2":
        ("rexnet/worker/spawn.py", "posix_spawn's dup2 action"),
    "twisted.internet.process.Process._setupChild":
        ("rexnet/worker/spawn.py", "setsid and default signals in a forked job"),
    "twisted.internet.process.PTYProcess._setupChild":
        ("rexnet/worker/spawn.py", "default signals in a job in a terminal"),
    "twisted.internet.process._BaseProcess":
        ("rexnet/worker/spawn.py", "a sandboxed job's transport: a Process or PTYProcess "
         "made without fork, whose end its supervisor reports"),
    "twisted.protocols.tls.TLSMemoryBIOProtocol._flushSendBIO":
        ("rexnet/net/bulktls.py", "a job channel's encrypted records drained once per 256 KiB"),
    "twisted.protocols.tls.TLSMemoryBIOProtocol._bufferedWrite":
        ("rexnet/net/bulktls.py", "what OpenSSL could not take yet, kept in Twisted's order"),
    "twisted.protocols.tls.TLSMemoryBIOProtocol._tlsShutdownFinished":
        ("rexnet/net/bulktls.py", "a TLS error or shutdown ends the connection as Twisted does"),
    "twisted.protocols.tls.TLSMemoryBIOProtocol._shutdownTLS":
        ("rexnet/net/bulktls.py", "a peer's TLS shutdown answered as Twisted does"),
    "twisted.internet._sslverify.IOpenSSLTrustRoot":
        ("rexnet/security/tls.py", "the type of the application CA's trust root"),
    "twisted.internet.base.ReactorBase._startedBefore":
        ("rexnet/client/executor.py", "a reactor that ran and stopped cannot restart"),
}


def resolve(dotted: str) -> object:
    """The object named DOTTED (a module, then attributes); AttributeError if missing."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("api", sorted(PRIVATE))
def test_the_private_api_still_exists(api: str) -> None:
    module, why = PRIVATE[api]
    if api.endswith("ReactorBase._startedBefore"):  # an instance attribute
        from twisted.internet.base import ReactorBase

        present = "_startedBefore" in inspect.getsource(ReactorBase.__init__)
    else:
        try:
            resolve(api)
            present = True
        except (AttributeError, ImportError):
            present = False
    assert present, (f"this Twisted release has no {api}, which {module} uses ({why}): "
                     "replace it there")


def test_the_spawn_hooks_keep_the_signatures_rexnet_overrides() -> None:
    from twisted.internet import process

    from rexnet.worker.spawn import SessionProcess

    theirs = list(inspect.signature(process.Process._trySpawnInsteadOfFork).parameters)
    ours = list(inspect.signature(SessionProcess._trySpawnInsteadOfFork).parameters)
    assert theirs == ours, ("twisted.internet.process.Process._trySpawnInsteadOfFork "
                            f"now takes {theirs}; rexnet/worker/spawn.py overrides it with "
                            f"{ours}")
    actions = inspect.signature(process._getFileActions).parameters
    assert {"doClose", "doDup2"} <= set(actions), (
        f"twisted.internet.process._getFileActions now takes {list(actions)}; "
        "rexnet/worker/spawn.py passes doClose and doDup2")


def test_sessions_really_start_with_posix_spawn() -> None:
    """The posix_spawn path is taken (not silently skipped for fork) where it can be."""
    from twisted.internet import process

    from rexnet.worker.spawn import SessionProcess

    assert SessionProcess._trySpawnInsteadOfFork is not process.Process._trySpawnInsteadOfFork
    assert callable(getattr(process, "_listOpenFDs", None))
    assert callable(getattr(process, "_getFileActions", None))


def uses(name: str) -> set[str]:
    """The files of rexnet/ whose code mentions NAME (as an attribute or a module)."""
    pattern = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])")
    return {str(p.relative_to(ROOT)) for p in (ROOT / "rexnet").rglob("*.py")
            if pattern.search(p.read_text())}


@pytest.mark.parametrize("api", sorted(PRIVATE))
def test_each_private_api_is_used_in_one_module_at_most(api: str) -> None:
    module, _ = PRIVATE[api]
    name = api.rsplit(".", 1)[1] if "._sslverify." not in api else "_sslverify"
    assert uses(name) <= {module}, f"{api} is used outside {module}: {uses(name) - {module}}"


def test_no_other_private_twisted_module_is_imported() -> None:
    allowed = {"twisted.internet._sslverify"}
    found: dict[str, str] = {}
    for path in (ROOT / "rexnet").rglob("*.py"):
        for match in re.finditer(r"(?:from|import)\s+(twisted(?:\.\w+)*\._\w+)", path.read_text()):
            found[match.group(1)] = str(path.relative_to(ROOT))
    assert set(found) <= allowed, f"private Twisted modules imported: {found}"


def test_the_tls_layers_instance_attributes_that_bulktls_reads_still_exist() -> None:
    """rexnet/net/bulktls.py reads these attributes of a TLSMemoryBIOProtocol (it leaves
    a layer without them alone, so a release that renames one silently loses the bulk
    path: this test names it instead)."""
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    from rexnet.net import bulktls

    source = inspect.getsource(TLSMemoryBIOProtocol)
    for name in bulktls._NEEDS:
        assert f"self.{name}" in source or hasattr(TLSMemoryBIOProtocol, name), (
            f"twisted.protocols.tls.TLSMemoryBIOProtocol has no {name} any more, which "
            "rexnet/net/bulktls.py uses: replace it there")
