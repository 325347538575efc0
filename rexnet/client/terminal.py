"""The client's terminal: raw mode that is always restored, and its window size."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import termios
import tty
from collections.abc import Iterator


def window_size(fd: int = 0) -> tuple[int, int]:
    """(rows, cols) of the terminal on FD, or (0, 0) if it is not a terminal."""
    try:
        rows, cols, _, _ = struct.unpack(
            "HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 0, 0
    return rows, cols


@contextlib.contextmanager
def raw_mode(fd: int = 0) -> Iterator[bool]:
    """Put the terminal on FD in raw mode (if it is one) and restore it however we leave."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
