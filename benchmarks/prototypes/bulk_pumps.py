"""Prototype pumps for issue P11 item 2 ("beyond one thread"), outside the product.

Run as root from the repository (after `make install`):

    .venv/bin/python benchmarks/prototypes/bulk_pumps.py [--runs N] [--size MiB] [--rexnet]

Builds benchmarks/bench.py's bed (namespaces client, w1, w2 on one bridge; a rexnet
worker and an sshd on each worker host), starts this script's own server on w1 and
streams SIZE (default 1 GiB) in and back out through `cat` on w1, from a client process
in the client namespace whose stdin and stdout are pipes (as the agent's are), with every
pump below alternated run by run against `ssh -c aes128-gcm@openssh.com w1 cat`:

- split-pyo    (a) two mutual-TLS connections per job (stdin on one, stdout on the
               other), each direction pumped by its own thread, blocking pyOpenSSL calls;
- split-proc   (a) the same, each direction in its own process (fork after handshake);
- split-std    (c) as split-pyo with the standard library's `ssl` (blocking sockets; a
               direction ends with a FIN, not close_notify: unwrap() waits for the peer);
- shared-pyo   (b) one connection, one thread per direction sharing the pyOpenSSL
               Connection (memory BIOs) under a lock; the socket non-blocking, a thread
               waits for it outside the lock, records leave in order (one sender at a time);
- shared-std   (b)+(c) the same over the standard library's SSLObject: NOT measured, it
               loses the stream's tail at the close (SSLEOFError, ~14 MB short), unfixed;
- ...-128      the same pump with TLS_AES_128_GCM_SHA256 only (d); the others negotiate
               what rexnet negotiates today: TLS 1.3 TLS_AES_256_GCM_SHA384 (checked with
               get_cipher_name on a handshake between rexnet.security.tls's
               listening_options and connecting_options);
- `--cipher-cost`: CPU seconds to encrypt and decrypt 1 GiB per suite, in memory.

Every connection is TLS 1.3 with certificates on both sides chaining to the bench's
application CA (rexnet's Ed25519 credentials; no hostname/role check: a prototype).
Pipes are widened to 1 MiB, reads are 256 KiB, as rexnet does since P11 #1; `--rexnet`
adds the product, `rexnet exec cat` through the agent, to the rotation. The one-thread
baseline is rexnet itself (a one-thread poll pump was tried and dropped: it hung).

Figures, 1 GiB in and back out through cat, MB/s median (min-max) of alternated runs,
ratio to ssh aes128-gcm in the same run (2 cores shared with other developers, noisy):

  `bulk_pumps.py --runs 3 --rexnet` (02:08 UTC):
    ssh aes128-gcm     166.5 (151.4-228.8)  1.00x
    split-pyo          208.0 (148.1-261.5)  1.25x
    split-proc         223.6 (104.3-264.6)  1.34x
    split-std          193.9 (150.2-291.7)  1.16x
    shared-pyo         149.7 (141.4-194.8)  0.90x
    split-pyo-128      199.3 (193.2-298.5)  1.20x
    shared-pyo-128     150.9 (141.9-227.2)  0.91x
    rexnet exec cat    115.9 (96.0-181.6)   0.70x
  `bulk_pumps.py --runs 5 --rexnet --modes split-pyo,split-pyo-128,shared-pyo` (02:11;
  in brackets the median of the run-by-run ratios):
    ssh aes128-gcm     244.5 (172.8-282.3)  1.00x
    split-pyo          251.7 (222.9-287.5)  1.03x  [1.04]
    split-pyo-128      290.5 (192.3-310.9)  1.19x  [1.11]
    shared-pyo         199.3 (165.1-256.9)  0.81x  [0.92]
    rexnet exec cat    155.9 (135.9-177.9)  0.64x  [0.64]
  `bulk_pumps.py --runs 5 --rexnet --modes split-pyo,split-proc,split-std` (02:14; in
  brackets the median of the run-by-run ratios to ssh, then to rexnet):
    ssh aes128-gcm     291.6 (159.7-336.4)  1.00x  [1.00, 1.35]
    split-pyo          269.6 (205.6-322.2)  0.92x  [1.10, 1.38]
    split-proc         271.7 (245.6-286.4)  0.93x  [0.93, 1.45]
    split-std          288.5 (238.5-318.3)  0.99x  [1.09, 1.42]
    rexnet exec cat    196.9 (168.3-229.4)  0.68x  [0.74, 1.00]
  `bulk_pumps.py --cipher-cost` (3 runs): TLS_AES_256_GCM_SHA384 0.96/1.01/0.97 CPU s,
  TLS_AES_128_GCM_SHA256 0.86/0.84/0.85 CPU s to encrypt and decrypt 1 GiB.

What this says:
- One thread per direction over two connections (split) is level with ssh: 0.92-1.34x
  over three runs (run-by-run ratios 0.93-1.11), ~1.4x rexnet, whose one reactor thread
  makes 0.64-0.70x in the same runs. So the split design is what gets to ~1.0x, not
  clearly beyond: on 2 shared cores ssh's two processes (ssh, sshd) are the same shape.
  cffi (pyOpenSSL) and the ssl module drop the GIL in SSL_read/SSL_write, os.read and
  os.write drop it too, so the two directions of a round trip run on both cores.
  Threads or processes: no clear difference (1.25x against 1.34x, then 0.92x, 0.93x).
- One connection shared by two threads under a lock (shared) stays below ssh (0.81-0.92x):
  every SSL call of one direction waits for the other's, and a sender blocked on a full
  socket must let the other thread queue its records behind its own (the ordering is
  the subtle part; a first version interleaved records). Not worth its complexity.
- stdlib ssl against pyOpenSSL for the same pump: no clear difference (1.16x against
  1.25x, then 0.99x against 0.92x: noise); stdlib's shared memory-BIO variant lost data
  at the close.
- The cipher: AES-128 saves ~0.12 CPU s per GiB encrypted and decrypted, ~3% of the
  3.5-3.9 CPU s the agent and the worker spend per round trip today; in the pumps the
  run-by-run ratio moved 1.04 -> 1.11, inside the noise. Not a clear win: not adopted
  (rexnet keeps OpenSSL's default TLS 1.3 order, AES-256-GCM first).

What adopting "split" in rexnet needs (not done in P11 #2 round 2, too big for the slot):
a job's bulk streams on connections of their own, each pumped by a thread with blocking
TLS calls and the reactor keeping the control frames (START, WINDOW, EXIT, signals):
1. the worker connects back a second time for the job (same listening port, same mutual
   TLS and role checks), and its first frame names the job with a single-use token the
   client sent in START (random, 32 bytes); the client accepts it only if the peer's
   certificate is the one of the job's first connection and the token is the job's, and
   refuses any further connection for that job (and any before START);
2. the stream's credit stays end to end: the pump thread reads its pipe only while the
   window has credit (a bounded queue of 256 KiB pieces to and from the reactor, e.g.
   `threading` + reactor.callFromThread), so memory stays bounded per job;
3. EXIT must follow the last stdout byte: the client drains the data connection to its
   TLS close_notify (a FIN without it is a truncation and an error) before it acts on
   EXIT; the agent side needs the same threads for the launcher's pipes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from OpenSSL import SSL, crypto

ROOT = Path(__file__).resolve().parent.parent.parent
PIECE = 256 * 1024
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
PORT = 4100
AES128 = b"TLS_AES_128_GCM_SHA256"
AES256 = b"TLS_AES_256_GCM_SHA384"
MODES = ["split-pyo", "split-proc", "split-std", "shared-pyo", "split-pyo-128", "shared-pyo-128"]


# -- credentials and TLS ----------------------------------------------------------------


def pem_parts(path: Path) -> tuple[bytes, bytes, bytes]:
    """(key, certificate, CA certificate) PEM of a rexnet credential file."""
    text = path.read_bytes()
    key_end = text.index(b"-----END PRIVATE KEY-----") + len(b"-----END PRIVATE KEY-----\n")
    certs = text[key_end:].split(b"-----END CERTIFICATE-----")
    return (text[:key_end], certs[0] + b"-----END CERTIFICATE-----\n",
            certs[1] + b"-----END CERTIFICATE-----\n")


def pyo_context(cred: Path, server: bool, cipher: bytes) -> SSL.Context:
    key, cert, ca = pem_parts(cred)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key))
    ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, cert))
    ctx.get_cert_store().add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, ca))
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *a: bool(a[-1]))
    if cipher:
        ctx.set_tls13_ciphersuites(cipher)
    return ctx


def std_context(cred: Path, server: bool, cipher: bytes) -> ssl.SSLContext:
    key, cert, ca = pem_parts(cred)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.NamedTemporaryFile() as f:
        f.write(cert + key)
        f.flush()
        ctx.load_cert_chain(f.name)
    ctx.load_verify_locations(cadata=ca.decode())
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Pyo:
    """A blocking pyOpenSSL connection: send all, receive into a buffer."""

    def __init__(self, conn: SSL.Connection) -> None:
        self.conn = conn

    def send(self, data: memoryview) -> None:
        self.conn.sendall(data)

    def recv_into(self, view: memoryview) -> int:
        try:
            return self.conn.recv_into(view)  # type: ignore[arg-type]
        except SSL.ZeroReturnError:
            return 0

    def pending(self) -> int:
        return self.conn.pending()

    def fileno(self) -> int:
        return self.conn.fileno()

    def shut(self) -> None:
        with contextlib.suppress(SSL.Error):
            self.conn.shutdown()

    def cipher(self) -> str:
        return str(self.conn.get_cipher_name())


class Std(Pyo):
    def __init__(self, conn: ssl.SSLSocket) -> None:  # type: ignore[override]
        self.conn = conn  # type: ignore[assignment]

    def send(self, data: memoryview) -> None:
        self.conn.sendall(data)

    def recv_into(self, view: memoryview) -> int:
        return self.conn.recv_into(view)  # type: ignore[no-any-return,arg-type]

    def shut(self) -> None:
        # unwrap() would wait for the peer's close_notify, which a split connection's
        # receiving end never sends: end the stream with a FIN (a ragged EOF, accepted)
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_WR)  # type: ignore[attr-defined,call-arg]

    def cipher(self) -> str:
        return str(self.conn.cipher()[0])  # type: ignore[attr-defined]


def wrap(sock: socket.socket, cred: Path, server: bool, std: bool, cipher: bytes) -> Pyo:
    """SOCK after a mutual TLS 1.3 handshake (server side if SERVER)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if std:
        ctx = std_context(cred, server, cipher)
        if cipher:
            ctx.set_ciphers("ECDHE+AESGCM")  # TLS 1.2 only; 1.3 suites are OpenSSL's order
        return Std(ctx.wrap_socket(sock, server_side=server))  # type: ignore[arg-type]
    conn = SSL.Connection(pyo_context(cred, server, cipher), sock)
    conn.set_accept_state() if server else conn.set_connect_state()
    conn.do_handshake()
    return Pyo(conn)


# -- pumps ------------------------------------------------------------------------------


def pipe_to_tls(fd: int, tls: Pyo, lock: threading.Lock | None = None) -> None:
    """Read FD PIECE at a time and send it on TLS; TLS shut down at FD's end."""
    buf = bytearray(PIECE)
    view = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if not n:
            break
        tls.send(view[:n])
    tls.shut()


def tls_to_pipe(tls: Pyo, fd: int) -> None:
    """Receive TLS records, write them to FD in pieces of up to PIECE; close FD at the end."""
    buf = bytearray(PIECE)
    view = memoryview(buf)
    sock = tls.fileno()
    got = 0
    while True:
        n = tls.recv_into(view[got:])
        got += n
        if n == 0 or got == PIECE or (tls.pending() == 0 and not select.select(
                [sock], [], [], 0)[0]):
            done = 0
            while done < got:
                done += os.write(fd, view[done:got])
            got = 0
        if n == 0:
            break
    os.close(fd)


class Locked:
    """One TLS object shared by two threads: every SSL call under one lock, the socket
    non-blocking, each thread waiting for its socket event outside the lock."""

    sock: socket.socket
    lock: threading.Lock
    std: bool
    obj: object  # SSL.Connection over memory BIOs, or ssl.SSLObject
    outgoing: bytearray
    sending: bool
    bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO]  # stdlib's (incoming, outgoing)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _flush(self) -> None:
        """Under the lock: what OpenSSL has to send, to the socket, in order. One thread
        sends at a time; while it waits for the socket (outside the lock) the other
        thread's records queue behind its own."""
        self.outgoing += self.bio_out()
        if self.sending:
            return
        self.sending = True
        try:
            while self.outgoing:
                try:
                    del self.outgoing[:self.sock.send(self.outgoing)]
                except BlockingIOError:
                    self.lock.release()
                    try:
                        select.select([], [self.sock], [])
                    finally:
                        self.lock.acquire()
        finally:
            self.sending = False

    def bio_out(self) -> bytes:
        if self.std:
            return self.bios[1].read()
        chunks = []
        while True:
            try:
                chunks.append(self.obj.bio_read(PIECE * 2))  # type: ignore[attr-defined]
            except SSL.WantReadError:
                return b"".join(chunks)

    def bio_in(self, data: bytes) -> None:
        if self.std:
            self.bios[0].write(data)
        else:
            self.obj.bio_write(data)  # type: ignore[attr-defined]

    def send(self, data: memoryview) -> None:
        with self.lock:
            done = 0
            while done < len(data):
                done += self.obj.write(data[done:]) if self.std else self.obj.send(  # type: ignore[attr-defined]
                    data[done:])
                self._flush()

    def recv_into(self, view: memoryview) -> int:
        """Decrypted bytes into VIEW: whatever is ready, else wait for the socket."""
        while True:
            with self.lock:
                try:
                    n = (self.obj.read(len(view), view) if self.std  # type: ignore[attr-defined]
                         else self.obj.recv_into(view))  # type: ignore[attr-defined]
                    self._flush()
                    return int(n)
                except (SSL.WantReadError, ssl.SSLWantReadError):
                    pass
                except (SSL.ZeroReturnError, ssl.SSLZeroReturnError):
                    return 0
                try:
                    data = self.sock.recv(PIECE)
                except BlockingIOError:
                    data = None
                if data == b"":
                    return 0
                if data:
                    self.bio_in(data)
                    continue
            select.select([self.sock], [], [])

    def pending(self) -> int:
        return int(self.obj.pending())  # type: ignore[attr-defined]

    def shut(self) -> None:
        with self.lock:
            with contextlib.suppress(SSL.Error, ssl.SSLError):
                self.obj.unwrap() if self.std else self.obj.shutdown()  # type: ignore[attr-defined]
            self._flush()


def memory_tls(sock: socket.socket, cred: Path, server: bool, std: bool, cipher: bytes
               ) -> Locked:
    """A mutual TLS 1.3 connection over memory BIOs on SOCK, handshake done, for sharing."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if std:
        ctx = std_context(cred, server, cipher)
        bios = (ssl.MemoryBIO(), ssl.MemoryBIO())
        obj: object = ctx.wrap_bio(*bios, server_side=server)
    else:
        bios = (ssl.MemoryBIO(), ssl.MemoryBIO())  # unused: pyOpenSSL has its own
        conn = SSL.Connection(pyo_context(cred, server, cipher), None)
        conn.set_accept_state() if server else conn.set_connect_state()
        obj = conn
    shared = Locked.__new__(Locked)
    shared.sock, shared.lock, shared.std, shared.obj = sock, threading.Lock(), std, obj
    shared.outgoing, shared.bios, shared.sending = bytearray(), bios, False
    while True:  # the handshake, blocking
        try:
            obj.do_handshake()  # type: ignore[attr-defined]
            break
        except (SSL.WantReadError, ssl.SSLWantReadError):
            sock.sendall(shared.bio_out())
            data = sock.recv(PIECE)  # (the handshake's own order: no thread yet)
            if not data:
                raise ConnectionError("closed during the handshake") from None
            shared.bio_in(data)
    sock.sendall(shared.bio_out())
    sock.setblocking(False)
    return shared


# -- server (on w1) and client (in the client namespace) --------------------------------


def widen(*fds: int) -> None:
    import fcntl
    for fd in fds:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)


def run_pair(fns: list[Callable[[], None]], procs: bool, fds: list[int]) -> None:
    """Run FNS to their end, each in a thread (or a forked process if PROCS: the process
    of FNS[i] keeps only FDS[i] of FDS open, the parent none, so that ends are seen)."""
    if procs:
        pids = []
        for i, fn in enumerate(fns):
            pid = os.fork()
            if pid == 0:
                try:
                    for j, fd in enumerate(fds):
                        if j != i:
                            os.close(fd)
                    fn()
                finally:
                    os._exit(0)
            pids.append(pid)
        for fd in fds:
            os.close(fd)
        for pid in pids:
            os.waitpid(pid, 0)
        return
    threads = [threading.Thread(target=fn) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def parse(mode: str) -> tuple[str, bool, bool, bytes]:
    """(shape, stdlib?, processes?, TLS 1.3 suite or b'' for the default) of MODE."""
    shape = mode.split("-")[0]
    return shape, "std" in mode, "proc" in mode, AES128 if mode.endswith("-128") else b""


def serve_job(first: socket.socket, second: socket.socket | None, cred: Path, mode: str
              ) -> None:
    shape, std, procs, cipher = parse(mode)
    cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert cat.stdin is not None and cat.stdout is not None
    win, rout = cat.stdin.fileno(), cat.stdout.fileno()
    widen(win, rout)
    if shape == "split":
        a = wrap(first, cred, True, std, cipher)
        assert second is not None
        b = wrap(second, cred, True, std, cipher)
        role = bytearray(1)  # which is which: the client's first byte on each
        a.recv_into(memoryview(role))
        b.recv_into(memoryview(bytearray(1)))
        ins, outs = (a, b) if role == b"i" else (b, a)
        print(f"cipher {a.cipher()}", file=sys.stderr, flush=True)
        run_pair([lambda: tls_to_pipe(ins, win), lambda: pipe_to_tls(rout, outs)], procs,
                 [win, rout])
    else:
        shared = memory_tls(first, cred, True, std, cipher)
        run_pair([lambda: tls_to_pipe(shared, win),  # type: ignore[arg-type]
                  lambda: pipe_to_tls(rout, shared)], False, [])  # type: ignore[arg-type]
    if not procs:
        cat.stdin.close()
    cat.wait()


def serve(port: int, cred: Path) -> None:
    """Serve jobs, each in a process of its own (a split job's two connections come one
    after the other, the second with the header "+")."""
    listener = socket.create_server(("0.0.0.0", port), backlog=16)
    while True:
        sock, _ = listener.accept()
        mode = sock.recv(16).rstrip(b"\0").decode()
        second = None
        if mode.startswith("split"):
            second, _ = listener.accept()
            second.recv(16)
        if os.fork() == 0:
            try:
                serve_job(sock, second, cred, mode)
            finally:
                os._exit(0)
        sock.close()
        if second is not None:
            second.close()
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass


def client(host: str, port: int, cred: Path, mode: str) -> None:
    shape, std, procs, cipher = parse(mode)
    widen(0, 1)

    def connect() -> socket.socket:
        sock = socket.create_connection((host, port))
        return sock

    first = connect()
    first.sendall(mode.encode().ljust(16, b"\0"))
    if shape == "split":  # (the server takes both connections before the handshakes)
        second = connect()
        second.sendall(b"+".ljust(16, b"\0"))
        ins = wrap(first, cred, False, std, cipher)
        ins.send(memoryview(b"i"))
        outs = wrap(second, cred, False, std, cipher)
        outs.send(memoryview(b"o"))
        run_pair([lambda: pipe_to_tls(0, ins), lambda: tls_to_pipe(outs, 1)], procs, [0, 1])
    else:
        shared = memory_tls(first, cred, False, std, cipher)
        run_pair([lambda: pipe_to_tls(0, shared),  # type: ignore[arg-type]
                  lambda: tls_to_pipe(shared, 1)], False, [])  # type: ignore[arg-type]


# -- the measurement --------------------------------------------------------------------


def cipher_cost(cred_dir: Path, size: int) -> None:
    """CPU seconds to encrypt and decrypt SIZE bytes through one pyOpenSSL pair over memory
    BIOs (no sockets), per TLS 1.3 suite: the cipher's whole share of a transfer."""
    from rexnet.security.credentials import keygen

    keygen("cost", cred_dir)
    for suite in (AES256, AES128):
        ends = []
        for server in (True, False):
            conn = SSL.Connection(pyo_context(cred_dir / ("cost.client" if server else
                                                          "cost.worker"), server, suite), None)
            conn.set_accept_state() if server else conn.set_connect_state()
            ends.append(conn)
        srv, cli = ends

        def move(a: SSL.Connection, b: SSL.Connection) -> None:
            with contextlib.suppress(SSL.WantReadError):
                while True:
                    b.bio_write(a.bio_read(1 << 20))

        for _ in range(10):
            for end in (cli, srv):
                with contextlib.suppress(SSL.WantReadError):
                    end.do_handshake()
            move(cli, srv)
            move(srv, cli)
        block = os.urandom(PIECE)
        t0 = time.process_time()
        for _ in range(size // PIECE):
            done = 0
            while done < PIECE:
                done += cli.send(block[done:])
            move(cli, srv)
            with contextlib.suppress(SSL.WantReadError):
                while True:
                    srv.recv(1 << 16)
        spent = time.process_time() - t0
        print(f"{srv.get_cipher_name()}: {spent:.2f} CPU s to encrypt and decrypt "
              f"{size >> 20} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024, help="MiB per run")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rexnet", action="store_true", help="rexnet exec cat too")
    parser.add_argument("--cipher-cost", action="store_true",
                        help="only the CPU cost of each TLS 1.3 suite, in memory")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "CRED"))
    parser.add_argument("--client", nargs=4, metavar=("HOST", "PORT", "CRED", "MODE"))
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), Path(args.serve[1]))
        return
    if args.cipher_cost:
        with tempfile.TemporaryDirectory() as tmp:
            cipher_cost(Path(tmp), args.size << 20)
        return
    if args.client:
        h, p, c, m = args.client
        client(h, int(p), Path(c), m)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench
    from netbed import NetBed, require_netns, sweep_stale
    from start_latency import ensure_sshd

    require_netns()
    sweep_stale()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    ensure_sshd()
    size = args.size << 20
    modes = [m for m in args.modes.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp, NetBed() as bed:
        work = Path(tmp)
        work.chmod(0o755)
        b = bench.build(bed, work)
        w1 = b.workers[0]
        me = [sys.executable, str(Path(__file__).resolve())]
        server = w1.popen([*me, "--serve", str(PORT), str(b.keys.worker)],
                          stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        gcm = [*b.ssh_to(w1, "-c", "aes128-gcm@openssh.com"), "cat"]
        pumps: dict[str, Callable[[], float]] = {
            "ssh aes128-gcm": lambda: bench.stream(gcm, size, True)}
        for mode in modes:
            argv = b.client.argv([*me, "--client", w1.addr(), str(PORT), str(b.keys.client),
                                  mode])
            pumps[mode] = lambda argv=argv: bench.stream(argv, size, True)  # type: ignore[misc]
        if args.rexnet:
            rex = b.rex("cat", agent=b.agent)
            env = b.agent_env if b.agent else None
            pumps["rexnet exec cat"] = lambda: bench.stream(rex, size, True, env)
        samples: dict[str, list[float]] = {name: [] for name in pumps}
        try:
            for run in range(args.runs):
                for name, fn in pumps.items():
                    try:
                        samples[name].append(fn())
                    except RuntimeError as e:
                        print(f"{name} failed: {e}", flush=True)
                    print(f"run {run} {name}: {samples[name][-1:] or '-'}", flush=True)
        finally:
            server.terminate()
            if b.agent:
                b.client.run([bench.REXNET, "agent", "--stop"], env=b.agent_env)
    base = statistics.median(samples["ssh aes128-gcm"])
    print(f"\n{args.size} MiB in and back out through cat, median (min-max) MB/s of "
          f"{args.runs} alternated runs; ratio to ssh aes128-gcm in the same run:")
    for name, values in samples.items():
        if values:
            m = statistics.median(values)
            print(f"  {name:16} {m:7.1f} ({min(values):.1f}-{max(values):.1f})  "
                  f"{m / base:.2f}x")


if __name__ == "__main__":
    main()
