"""TargetModel keys and the Triton model names they map to.

A TargetModel is a key relative to the store prefix, such as `cities/Houston_TX.tar.gz`. Triton model names
may not contain `/` and double as directory names in the model repository, so each key maps to a readable,
unique name: a slug of the key plus 128 bits of a hash of the store and key. Keys that share a long prefix
share a slug, so the hash alone tells them apart: 32 bits, as names once had, let one of a few hundred
thousand such keys take another's name, and a pair was found by brute force in a tenth of a second. With 128
bits an accidental collision is out of reach and a deliberate one costs some 2^64 hashes; should one happen
anyway, the manager refuses the second key rather than answering with the first key's model. Two stores
never share a name in one Triton.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

from gateway.errors import InvalidModelKey

MAX_KEY_LENGTH = 1024
MAX_SEGMENT_BYTES = 255  # a file name's limit on every common file system (and S3 keys become file names here)
_SHOWN = 80
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
SLUG_MAX = 48  # characters of the readable part of a Triton name
HASH_HEX = 32  # hex digits of the hash that makes a Triton name unique: 128 bits (names are at most 81 characters)


@dataclass(frozen=True)
class ModelKey:
    """A validated TargetModel, the namespace it is a key in (the store's URL, or a registered model's) and
    its Triton name. Two ModelKeys are the same model only if all three are equal."""

    key: str
    triton_name: str
    namespace: str = ""

    def __str__(self) -> str:
        return self.key


def _shown(key: str) -> str:
    return repr(key if len(key) <= _SHOWN else key[:_SHOWN] + "...")


@functools.lru_cache(maxsize=65536)  # every request validates its key; a refused key raises, and is not kept
def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative key under the store prefix, else raise InvalidModelKey.

    Refused: empty keys, absolute paths, `.`/`..` segments, empty segments, backslashes, control
    characters and segments over 255 bytes. These are the ways a key could name something outside the prefix
    on a local store or an S3 prefix, or produce an unusable file name. Messages show at most the first 80
    characters of the key.
    """
    if not key or not key.strip():
        raise InvalidModelKey("TargetModel is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidModelKey(f"TargetModel {_shown(key)} is longer than {MAX_KEY_LENGTH} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise InvalidModelKey(f"TargetModel {_shown(key)} contains control characters")
    if "\\" in key:
        raise InvalidModelKey(f"TargetModel {_shown(key)} contains a backslash")
    if key.startswith("/"):
        raise InvalidModelKey(f"TargetModel {_shown(key)} is absolute; it must be relative to the store prefix")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidModelKey(f"TargetModel {_shown(key)} escapes or is not a plain path under the store prefix")
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise InvalidModelKey(f"TargetModel {_shown(key)} has a path segment longer than {MAX_SEGMENT_BYTES} bytes")
    return key


def _slug(key: str) -> str:
    base = key
    for suffix in _ARCHIVE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    slug = _SLUG_UNSAFE.sub("-", base.replace("/", "--")).strip("-.") or "model"
    return slug[:SLUG_MAX]


def triton_name_for(key: str, namespace: str = "") -> str:
    """The Triton model name for `key`: `<slug>-<32 hex>`; the hash covers the namespace (store URL) too."""
    digest = hashlib.sha256(f"{namespace}\0{key}".encode()).hexdigest()[:HASH_HEX]
    return f"{_slug(key)}-{digest}"


def is_name_of(triton_name: str, key: str, namespace: str) -> bool:
    """Whether `triton_name` is the name `key` of `namespace` has now: how the staging area tells its own
    directories from ones left by an older naming or damaged metadata."""
    try:
        validate_key(key)
    except InvalidModelKey:
        return False
    return triton_name_for(key, namespace) == triton_name


@functools.lru_cache(maxsize=65536)
def model_key(key: str, namespace: str = "") -> ModelKey:
    """Validate `key` and pair it with its Triton name (cached: every request resolves its key)."""
    return ModelKey(key=validate_key(key), triton_name=triton_name_for(key, namespace), namespace=namespace)
