"""Bulk writes through Twisted's TLS layer in large pieces (issue P11, item 2: fewer copies).

Twisted's TLSMemoryBIOProtocol hands OpenSSL 16 KiB at a time: for each piece it copies a
slice of the caller's bytes, calls SSL_write, reads at most 32 KiB back out of the memory
BIO and writes that to the TCP transport, three Python-level calls and two copies per TLS
record. `bulk_writes` makes one TLS layer hand OpenSSL a memoryview (no slice copies; the
SSL_write calls still take a record each, pyOpenSSL enables partial writes) and drain the
BIO once per SEND_PIECE, in one read and one transport write: the same records on the
wire, the same OpenSSL connection and checks, a sixteenth of the BIO reads and writes.
Received records are decrypted as before, one SSL_read each, but handed to the protocol
(the channel's frame decoder) up to RECV_PIECE at a time, not a record at a time.

The handshake, renegotiation's WantReadError (buffered, as Twisted does), TLS shutdown
and errors (the connection is shut, as Twisted does, after the bytes that came before
them are delivered) keep their behaviour. A transport that is not a TLSMemoryBIOProtocol,
or one whose internals are not what this module knows, is left alone.
"""

from __future__ import annotations

import types
from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

SEND_PIECE = 256 * 1024
# what one drain of the send BIO may read: a piece's records and their overhead, with room
DRAIN = 2 * SEND_PIECE
RECV_PIECE = 256 * 1024  # decrypted bytes handed to the protocol at once, at most
RECORD = 1 << 15  # what one SSL_read may return (a record is at most 16 KiB)

_NEEDS = ("_tlsConnection", "_lostTLSConnection", "_bufferedWrite", "_tlsShutdownFinished",
          "_shutdownTLS", "_aborted", "transport")


def tls_layer(transport: Any) -> TLSMemoryBIOProtocol | None:
    """The TLSMemoryBIOProtocol under a channel's TRANSPORT: the transport itself
    (wrapClientTLS) or its protocol (listenSSL's connection); None when there is none."""
    for candidate in (transport, getattr(transport, "protocol", None)):
        if isinstance(candidate, TLSMemoryBIOProtocol):
            return candidate
    return None


def bulk_writes(transport: Any) -> bool:
    """Make the TLS layer under TRANSPORT write in SEND_PIECE pieces; whether it did."""
    tls = tls_layer(transport)
    if tls is None or not all(hasattr(tls, name) for name in _NEEDS):
        return False
    tls._write = types.MethodType(_write, tls)  # type: ignore[method-assign]
    tls._flushSendBIO = types.MethodType(_flush_send_bio, tls)  # type: ignore[method-assign]
    tls._flushReceiveBIO = types.MethodType(_flush_receive_bio, tls)  # type: ignore[method-assign]
    return True


def _write(self: TLSMemoryBIOProtocol, data: bytes) -> None:
    """TLSMemoryBIOProtocol._write, a SEND_PIECE at a time from a view of DATA."""
    if self._lostTLSConnection:
        return
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            end = min(done + SEND_PIECE, len(view))
            try:
                while done < end:  # SSL_write takes a record at a time (partial writes)
                    done += self._tlsConnection.send(view[done:end])
            except WantReadError:
                self._flushSendBIO()
                self._bufferedWrite(bytes(view[done:]))
                return
            except Error:  # as Twisted: the connection is shut with the error
                self._tlsShutdownFinished(Failure())
                return
            self._flushSendBIO()  # the piece's records, in one write to the transport


def _flush_send_bio(self: TLSMemoryBIOProtocol) -> None:
    """Everything waiting in the send BIO to the transport, DRAIN bytes a read."""
    while True:
        try:
            data = self._tlsConnection.bio_read(DRAIN)
        except WantReadError:  # nothing (more) in the BIO
            return
        self.transport.write(data)  # type: ignore[union-attr]
        if len(data) < DRAIN:
            return


def _flush_receive_bio(self: TLSMemoryBIOProtocol) -> None:
    """TLSMemoryBIOProtocol._flushReceiveBIO, delivering up to RECV_PIECE at a time."""
    pieces: list[bytes] = []
    size = 0

    def deliver() -> None:
        nonlocal pieces, size
        if pieces and not self._aborted:
            ProtocolWrapper.dataReceived(self, pieces[0] if len(pieces) == 1 else
                                         b"".join(pieces))
        pieces, size = [], 0

    while not self._lostTLSConnection:
        try:
            data = self._tlsConnection.recv(RECORD)
        except WantReadError:  # no whole record left in the BIO
            break
        except ZeroReturnError:  # the peer shut TLS down: what came first, then the end
            deliver()
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
        except Error:
            failure = Failure()
            deliver()
            self._tlsShutdownFinished(failure)
        else:
            pieces.append(data)
            size += len(data)
            if size >= RECV_PIECE:
                deliver()
    deliver()
    self._flushSendBIO()  # what the received records made OpenSSL answer
