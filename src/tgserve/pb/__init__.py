"""gRPC code generated from proto/generate.proto: built by `make`, or on first import if missing."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_PROTO = _HERE.parents[2] / "proto" / "generate.proto"


def _generate() -> None:
    # An editable checkout may not have run `make` yet; generate once, from the repo's proto.
    from grpc_tools import protoc

    src_root = _HERE.parents[1]
    args = [
        "protoc",
        f"-Itgserve/pb={_PROTO.parent}",
        f"--python_out={src_root}",
        f"--pyi_out={src_root}",
        f"--grpc_python_out={src_root}",
        str(_PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {_PROTO}")


if not (_HERE / "generate_pb2.py").exists() and _PROTO.exists():
    _generate()

from tgserve.pb import generate_pb2, generate_pb2_grpc  # noqa: E402

__all__ = ["generate_pb2", "generate_pb2_grpc"]
