"""Regenerate the Python modules from protos/fcmoe.proto with grpcio-tools.

The generated modules are committed so that running the project needs no code generation;
tests/unit/protos/test_generate.py regenerates into a temporary folder and fails when the committed ones are stale.
Run: ``python -m protos.generate``.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "fcmoe.proto"
OUTPUTS = ("fcmoe_pb2.py", "fcmoe_pb2.pyi", "fcmoe_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Run protoc on fcmoe.proto into out_dir and make the gRPC module import its sibling relatively."""
    from grpc_tools import protoc  # dev-only dependency

    args = [
        "protoc",
        f"-I{HERE}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    grpc_module = out_dir / "fcmoe_pb2_grpc.py"
    text = grpc_module.read_text()
    text = re.sub(r"^import fcmoe_pb2 as", "from . import fcmoe_pb2 as", text, flags=re.M)
    grpc_module.write_text(text)


def stale_outputs() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [n for n in OUTPUTS if (Path(tmp) / n).read_text() != (HERE / n).read_text()]


if __name__ == "__main__":
    generate(HERE)
    print("generated", ", ".join(OUTPUTS), file=sys.stderr)
