"""What an error message may tell a client: the TargetModel and the cause, never the gateway's insides.

Messages come from many places the gateway does not control: Triton (its repository paths, internal model
names, a Python model's traceback), botocore (the S3 endpoint), the OS (file paths). Every edge passes what
it answers through `public()`, which
- puts the TargetModel back for every internal Triton name it knows,
- replaces the cache directory, the store's location and Triton's addresses, then any URL, IP address and
  absolute path left, by a placeholder,
- cuts Python tracebacks down to their last line (the exception and its message),
- and keeps at most `MAX_CHARS` characters (cut before any pattern runs, so the work stays bounded),
while the log keeps the full text. The configuration is set once at start (`configure`); unconfigured, only
the generic rules apply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from gateway.naming import HASH_HEX, SLUG_MAX

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>)]+")
_ADDRESS = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b|\blocalhost:\d+\b|\[[0-9a-fA-F:]+\](?::\d+)?")
# An absolute path of two or more segments, not the tail of a relative key ('cities/Houston_TX.tar.gz').
_PATH = re.compile(r"(?<![\w.\-/~])/(?:[\w.\-@+=~]+/)+[\w.\-@+=~]*")
# Bounded to the longest name the gateway makes: an unbounded run would backtrack quadratically on client text.
_INTERNAL_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{SLUG_MAX}}}-[0-9a-f]{{{HASH_HEX}}}\b")
_TRACEBACK = "Traceback (most recent call last):"
MAX_CHARS = 4096  # of a message shown to a client; the log keeps the whole text

_literals: list[tuple[str, str]] = []
_names: Callable[[], Mapping[str, str]] = dict


def configure(literals: Mapping[str, str], names: Callable[[], Mapping[str, str]]) -> None:
    """`literals`: exact strings to hide and what to show instead (longest are replaced first); `names`:
    the current Triton name -> TargetModel map."""
    global _literals, _names
    _literals = sorted(((k, v) for k, v in literals.items() if k), key=lambda kv: -len(kv[0]))
    _names = names


def _strip_tracebacks(text: str) -> str:
    if _TRACEBACK not in text:
        return text
    kept, inside = [], False
    for line in text.splitlines():
        if _TRACEBACK in line:
            head = line.split(_TRACEBACK, 1)[0].rstrip()
            if head:
                kept.append(head)
            inside = True
            continue
        if inside and (line.startswith((" ", "\t")) or not line.strip()):
            continue  # a frame, its source line, or a blank line inside the traceback
        inside = False
        kept.append(line)
    return "\n".join(kept)


def public(text: str) -> str:
    """`text` as a client may see it, cut to `MAX_CHARS` before any pattern runs: the work stays bounded whatever
    the message quotes (Triton echoes a client's input name, which may be megabytes: 8 MiB took seconds)."""
    if not text:
        return text
    text = _strip_tracebacks(text)  # linear; first, so a long traceback still shows its exception line
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS] + " [...]"
    names = _names()
    if names:
        text = _INTERNAL_NAME.sub(lambda m: names.get(m.group(0), m.group(0)), text)
    for secret, shown in _literals:
        text = text.replace(secret, shown)
    text = _URL.sub("<url>", text)
    text = _ADDRESS.sub("<address>", text)
    return _PATH.sub("<path>", text)
