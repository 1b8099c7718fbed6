"""API keys: created once, stored only as hashes, checked per request with two scopes, `invoke` and `manage`.

A key is 32 random bytes (`mme_` + URL-safe base64), shown once when it is created; the gateway keeps only
`sha256:<hex>` of it, so a leaked keys file or secret grants nothing. A plain SHA-256 suffices (no slow KDF):
the keys are random, not passwords, so there is nothing to guess from the hash. Each line of a keys file
(`--api-keys-file`) or of `--api-keys` is `NAME SCOPES sha256:HEX`, SCOPES being `invoke`, `manage` or
`invoke,manage`; `#` starts a comment. Several keys may be valid at once, which is how keys are rotated: add
the new one, move clients over, remove the old one. The file is read again when it changes, without a
restart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

INVOKE, MANAGE = "invoke", "manage"
SCOPES = (INVOKE, MANAGE)
KEY_PREFIX = "mme_"
_DIGEST_PREFIX = "sha256:"
_RECHECK_S = 1.0  # how often the keys file's modification time is looked at


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its name (for logs), its scopes and the hash of its secret."""

    name: str
    scopes: frozenset[str]
    digest: str


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return _DIGEST_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def key_line(name: str, scopes: tuple[str, ...], key: str) -> str:
    """The line that grants `key` (never the key itself) for a keys file or --api-keys."""
    return f"{name} {','.join(scopes)} {digest(key)}"


def parse_scopes(text: str) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in scopes if s not in SCOPES]
    if not scopes or unknown:
        raise ValueError(f"scopes {text!r}: expected a comma-separated list of {', '.join(SCOPES)}")
    return scopes


def parse_keys(text: str, origin: str) -> list[ApiKey]:
    """Every `NAME SCOPES sha256:HEX` line of `text`; a bad line is an error naming `origin` and its number."""
    keys = []
    for number, raw in enumerate(text.replace(";", "\n").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"{origin} line {number}: expected 'NAME SCOPES sha256:HEX', got {len(parts)} fields")
        name, scopes, hashed = parts
        hex_part = hashed.removeprefix(_DIGEST_PREFIX)
        if not hashed.startswith(_DIGEST_PREFIX) or len(hex_part) != 64 or not all(c in "0123456789abcdef"
                                                                                     for c in hex_part):
            raise ValueError(f"{origin} line {number}: the key must be given as sha256:<64 hex digits>, never "
                             "in clear (mme-gateway keys create prints the line)")
        try:
            keys.append(ApiKey(name, frozenset(parse_scopes(scopes)), hashed))
        except ValueError as exc:
            raise ValueError(f"{origin} line {number}: {exc}") from None
    return keys


class KeyRing:
    """The keys in force: from the keys file (re-read when it changes) and from the inline setting.

    `enabled` is whether any key source is configured at all; a configured source with no keys in it
    refuses everyone, it never falls back to open access.
    """

    def __init__(self, file: Path | None, inline: str | None) -> None:
        self.file = file
        self._inline = parse_keys(inline, "--api-keys") if inline else []
        self.enabled = file is not None or inline is not None
        self._by_digest: dict[str, ApiKey] = {}
        self._file_state: tuple[int, int] | None = None
        self._checked_at = 0.0
        self._load(initial=True)

    def _stat(self) -> tuple[int, int] | None:
        assert self.file is not None
        try:
            st = os.stat(self.file)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _load(self, initial: bool = False) -> None:
        keys = list(self._inline)
        if self.file is not None:
            state = self._stat()
            if state is None:
                if initial:
                    raise ValueError(f"--api-keys-file {self.file} does not exist")
                log.error("auth.keys_file_missing", extra={"file": str(self.file)})  # keep the keys we had
                return
            try:
                keys += parse_keys(self.file.read_text(), str(self.file))
            except (ValueError, OSError, UnicodeDecodeError) as exc:
                if initial:
                    raise ValueError(str(exc)) from None
                log.error("auth.keys_file_invalid", extra={"file": str(self.file), "error": str(exc)})
                return  # a half-written file must not lock everyone out: the previous keys stay
            self._file_state = state
        self._by_digest = {key.digest: key for key in keys}
        log.info("auth.keys_loaded", extra={"keys": len(keys), "names": sorted({k.name for k in keys})})

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.file is None or now - self._checked_at < _RECHECK_S:
            return
        self._checked_at = now
        if self._stat() != self._file_state:
            self._load()

    def check(self, token: str) -> ApiKey | None:
        """The key whose secret is `token`, or None."""
        self._refresh()
        return self._by_digest.get(digest(token))
