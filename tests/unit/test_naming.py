import pytest

from gateway.errors import InvalidModelKey
from gateway.naming import model_key, triton_name_for, validate_key


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
