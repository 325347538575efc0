"""Text a peer chose (worker names, versions, messages), made safe to print on a terminal."""

from __future__ import annotations


def printable(text: str, limit: int = 200) -> str:
    """TEXT with every control character (ESC, CR, BEL, C1 controls, DEL, ...) and every
    backslash written as a Python escape, and cut to LIMIT characters: a peer cannot move
    the cursor, retitle the window or forge lines on the reader's terminal."""
    out = []
    for ch in text[:limit]:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or 0x7F <= code < 0xA0 or code in (0x2028, 0x2029):
            out.append(repr(ch)[1:-1] if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out) + ("..." if len(text) > limit else "")
