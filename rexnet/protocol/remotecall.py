"""Remote calls: the pickled call a client sends, and what a `rexnet-worker --python` runs.

The worker runs each job as ``python -P -c RUNNER`` (its own interpreter, sys.executable):
the process reads MAGIC_CALL + a 32-byte key + pickle((fn, args, kwargs)) from stdin,
calls fn, and writes MAGIC_RESULT + HMAC-SHA256(key, body) + body on its result channel,
where the body is pickle(envelope) and the envelope says whether the call returned or
raised and carries the value or the exception (pickled on their own, so that an
exception that cannot be unpickled on the client still arrives as a RemoteError with its
type, message and traceback text). Anything the call prints goes to the job's stderr.

The result channel is the job's stdout pipe, taken away from fd 1 before any of the
client's code is unpickled: the runner keeps it on a close-on-exec descriptor that its
forked children close at once (os.register_at_fork), and fd 1 becomes stderr. So only
the runner's own process holds it; no program the call starts, and no process it forks,
can write into the result. The client unpickles nothing that is not authenticated with
the key it chose for this call (a stray or forged result is a NoResult, never loaded).
Other jobs are kept away from the pipe by the worker's sandbox (rexnet.worker.sandbox):
another uid, another PID namespace, and no process of a finished job left running.

cloudpickle is used when it is installed (lambdas, closures and functions of __main__ go
by value); otherwise the standard pickle (module-level functions, by reference). Either
way the same code must be importable on every host, and pickle runs code when it loads:
a worker started with --python runs any code its authenticated clients send (as the job
user), and the clients trust the application's authenticated workers.

This module imports only the standard library (and cloudpickle), so the worker's Python
processes start quickly.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import pickle
import sys
import traceback
from typing import Any

MAGIC_CALL = b"rexnet-call/2\n"
MAGIC_RESULT = b"rexnet-result/2\n"
KEY_SIZE = 32
TAG_SIZE = 32
RUNNER = "import sys; sys.path.append(''); from rexnet.protocol.remotecall import serve; serve()"
"""The runner's program, for ``python -P -c RUNNER`` (RUNNER_ARGV): -P keeps the job's
working directory off the front of sys.path, where a file planted there (a ``pickle.py``,
a ``rexnet/``) would be imported in place of the standard library's or ours and see the
call's key and arguments; the directory comes last instead, so the callables' modules
that live there still import."""
RUNNER_ARGV = ("-P", "-c", RUNNER)


def dumps(obj: object) -> bytes:
    """Pickle OBJ with cloudpickle if it is installed, else with pickle (imported here, so
    that the worker's options, which need only RUNNER, do not load it)."""
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - cloudpickle is a dependency
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return data


class RemoteError(Exception):
    """An exception raised by a remote call that could not travel back as itself (it
    could not be pickled on the worker or unpickled here)."""

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteError, (self.type_name, self.message, self.remote_traceback))


def new_key() -> bytes:
    """A fresh key for one call: its result must be authenticated with it."""
    return os.urandom(KEY_SIZE)


def encode_call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], key: bytes) -> bytes:
    """The job's stdin for calling FN(*ARGS, **KWARGS) whose result KEY authenticates
    (pickling errors raise here)."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"a call key is {KEY_SIZE} bytes")
    return MAGIC_CALL + key + dumps((fn, args, kwargs))


def _tag(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, MAGIC_RESULT + body, hashlib.sha256).digest()


def encode_result(envelope: dict[str, Any], key: bytes) -> bytes:
    body = pickle.dumps(envelope, protocol=pickle.HIGHEST_PROTOCOL)
    return MAGIC_RESULT + _tag(key, body) + body


def take_result_channel() -> Any:
    """Move the result channel (fd 1, the job's stdout) to a descriptor of this process
    alone (close-on-exec, closed in forked children), and send fd 1 to stderr."""
    result = os.fdopen(os.dup(1), "wb")  # os.dup: not inheritable

    def close_in_child() -> None:
        with contextlib.suppress(OSError):
            os.close(result.fileno())

    os.register_at_fork(after_in_child=close_in_child)
    os.dup2(2, 1)
    return result


def _error_envelope(exc: BaseException) -> dict[str, Any]:
    text = "".join(traceback.format_exception(exc))
    try:
        value: bytes | None = dumps(exc)
    except Exception:  # an exception that cannot be pickled: its type, text and traceback
        value = None
    return {"ok": False, "value": value, "traceback": text,
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc)}


def serve() -> None:
    """Run one call: the body of the worker's ``python -c`` job process."""
    result = take_result_channel()  # before any of the client's code runs
    data = sys.stdin.buffer.read()
    if not data.startswith(MAGIC_CALL) or len(data) < len(MAGIC_CALL) + KEY_SIZE:
        sys.stderr.write("rexnet: this worker runs Python calls (rexnet-worker --python) "
                         "of this rexnet version; send them with rexnet.Executor.call\n")
        sys.exit(2)
    key = data[len(MAGIC_CALL):len(MAGIC_CALL) + KEY_SIZE]
    envelope: dict[str, Any]
    try:
        fn, args, kwargs = pickle.loads(data[len(MAGIC_CALL) + KEY_SIZE:])
        del data
        value = fn(*args, **kwargs)
    except BaseException as exc:
        envelope = _error_envelope(exc)
    else:
        try:
            envelope = {"ok": True, "value": dumps(value)}
        except Exception as exc:
            error = TypeError(f"the call's result ({type(value).__qualname__}) cannot be "
                              f"pickled: {exc}")
            error.__cause__ = exc
            envelope = _error_envelope(error)
    sys.stdout.flush()
    result.write(encode_result(envelope, key))
    result.close()


class NoResult(Exception):
    """The job's stdout holds no result (the process was no call runner, or died)."""


class Unloadable(Exception):
    """The call's value cannot be unpickled here (its code is missing, or differs)."""


def decode_result(stdout: bytes, worker: str, key: bytes) -> tuple[bool, Any]:
    """From a call job's STDOUT: (True, value), or (False, the exception it raised, with the
    remote traceback text as ``remote_traceback`` and as a note; a RemoteError if the
    exception itself could not travel). NoResult if there is no result authenticated with
    the call's KEY (nothing else is unpickled), Unloadable if its value cannot load here."""
    if not stdout.startswith(MAGIC_RESULT):
        raise NoResult("no result")
    start = len(MAGIC_RESULT) + TAG_SIZE
    body = stdout[start:]
    if not hmac.compare_digest(stdout[len(MAGIC_RESULT):start], _tag(key, body)):
        raise NoResult("a result not authenticated with this call's key (refused unread)")
    try:
        envelope = pickle.loads(body)
    except Exception as e:
        raise NoResult(f"a damaged result: {e}") from e
    if envelope["ok"]:
        try:
            return True, pickle.loads(envelope["value"])
        except Exception as e:
            raise Unloadable(f"{type(e).__name__}: {e}") from e
    text: str = envelope["traceback"]
    exc: Any = None
    if envelope["value"] is not None:
        try:
            exc = pickle.loads(envelope["value"])
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(envelope["type"], envelope["message"], text)
    with contextlib.suppress(AttributeError):  # an exception type with __slots__
        exc.remote_traceback = text
    exc.add_note(f"remote traceback (worker {worker}):\n{text.rstrip()}")
    return False, exc
