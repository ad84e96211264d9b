"""A command run in a pseudo-terminal (the stdlib's pty), and the screen it leaves: what a
person at a terminal sees, with lines redrawn in place (\\r, ESC[K) drawn as a terminal does."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import struct
import termios
import fcntl
import time

_ERASE_LINE = re.compile(r"\x1b\[[0-2]?K")
_OTHER_CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(argv: list[str], cwd, env: dict, timeout: float, columns: int = 160) -> tuple[int, str]:
    """Run argv with a terminal as its stdin/stdout/stderr; its exit code and every byte it wrote."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal is its controlling terminal
        try:
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace")


def screen(raw: str) -> list[str]:
    """The lines as they stay on the screen."""
    lines: list[str] = []
    line: list[str] = []
    col = 0
    i = 0
    text = raw.replace("\r\n", "\n")
    while i < len(text):
        erase = _ERASE_LINE.match(text, i)
        if erase:
            del line[col:]
            i = erase.end()
            continue
        other = _OTHER_CSI.match(text, i)
        if other:
            i = other.end()
            continue
        ch = text[i]
        i += 1
        if ch == "\n":
            lines.append("".join(line))
            line, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
    if line:
        lines.append("".join(line))
    return lines
