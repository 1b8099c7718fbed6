import hashlib

import pytest

from gateway.errors import InvalidModelKey
from gateway.naming import HASH_HEX, SLUG_MAX, model_key, triton_name_for, validate_key


@pytest.mark.parametrize("key", ["Houston_TX.tar.gz", "cities/Houston_TX.tar.gz", "a/b/c.tgz", "x y.tar.gz"])
def test_plain_relative_keys_are_accepted(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key", ["", " ", "/abs.tar.gz", "../up.tar.gz", "a/../../b", "a//b", "a/./b", "a\\b", "bad\x00key", "a/"]
)
def test_keys_that_escape_or_are_malformed_are_refused(key: str) -> None:
    with pytest.raises(InvalidModelKey):
        validate_key(key)


def test_triton_names_are_readable_unique_and_namespaced() -> None:
    name = triton_name_for("cities/Houston_TX.tar.gz", "s3://b/p/")
    assert name.startswith("cities--Houston_TX-") and "/" not in name
    assert triton_name_for("cities/Houston_TX.tar.gz", "s3://other/") != name
    assert triton_name_for("cities-/Houston_TX.tar.gz", "s3://b/p/") != name  # slugs may collide, names do not
    assert model_key("a.tar.gz", "ns").triton_name == triton_name_for("a.tar.gz", "ns")


def test_keys_under_one_long_prefix_do_not_share_a_name() -> None:
    """Keys that differ only after the readable part's limit are told apart by the hash alone: with 32 bits,
    one of 300,000 such keys shares another's name all but surely (and an attacker finds a pair in 0.1 s)."""
    names: dict[str, str] = {}
    for i in range(300_000):
        key = "x" * 60 + f"{i}.tar.gz"
        name = triton_name_for(key, "file:///store")
        assert names.setdefault(name, key) == key, f"{key!r} and {names[name]!r} share the Triton name {name}"


def test_names_keep_at_least_64_bits_of_hash_and_fit_a_file_name() -> None:
    key = "/".join(["k" * 255] * 4)  # the longest keys: the slug is cut, the hash is kept whole
    name = triton_name_for(key, "s3://b/p/")
    assert HASH_HEX * 4 >= 64
    assert name == "k" * SLUG_MAX + "-" + hashlib.sha256(f"s3://b/p/\0{key}".encode()).hexdigest()[:HASH_HEX]
    assert len(f"{name}.json.tmp".encode()) < 255  # the longest file the staging area names after a model
