import pytest

from gateway.api.fastpath import parse_infer_path


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/v2/models/Houston_TX.tar.gz/infer", ("Houston_TX.tar.gz", None)),
        ("/v2/models/cities/Houston_TX.tar.gz/infer", ("cities/Houston_TX.tar.gz", None)),
        ("/v2/models/cities/Houston_TX.tar.gz/versions/3/infer", ("cities/Houston_TX.tar.gz", "3")),
        ("/v2/models/../x.tar.gz/infer", ("../x.tar.gz", None)),  # the manager refuses it with 400
        ("/v2/models//infer", None),
        ("/v2/models/infer", None),
        ("/v2/models/m/config", None),
        ("/invocations", None),
    ],
)
def test_infer_paths_are_recognised_as_starlettes_routes_would(path, expected) -> None:
    assert parse_infer_path(path) == expected
