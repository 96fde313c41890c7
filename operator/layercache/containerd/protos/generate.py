"""Regenerate the protobuf and gRPC modules of this package from its ``.proto`` files.

Usage: ``python -m layercache.containerd.protos.generate [--out DIR]``. Without ``--out``
the generated ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` replace the committed ones
next to the ``.proto`` files; with it they go to ``DIR/layercache/containerd/protos/``
(what the unit test compares against the committed files).

The protos are compiled with the source root (``operator/``) as the include path, so a
generated module imports its siblings as ``layercache.containerd.protos.<name>_pb2``. The
output depends on the grpcio-tools version (its protoc stamps the protobuf gencode version
into every ``_pb2.py``): use the version pinned in pyproject's ``test`` extra.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Final

__all__ = ["PACKAGE_DIR", "SOURCE_ROOT", "generate", "proto_files"]

#: This package's directory, where the .proto files and the committed modules live.
PACKAGE_DIR: Final = Path(__file__).resolve().parent
#: The source root that holds the top-level package ``layercache`` (``operator/``).
SOURCE_ROOT: Final = PACKAGE_DIR.parents[2]


def proto_files() -> list[Path]:
    """The ``.proto`` files of this package, sorted, relative to `SOURCE_ROOT`."""
    return sorted(p.relative_to(SOURCE_ROOT) for p in PACKAGE_DIR.glob("*.proto"))


def generate(out_root: Path = SOURCE_ROOT) -> list[Path]:
    """Compile every ``.proto`` of this package into ``out_root``; returns the files written.

    Files land in ``out_root/layercache/containerd/protos/`` (created if missing).

    Raises:
        ModuleNotFoundError: grpcio-tools is not installed (it is a development dependency).
        RuntimeError: protoc reported an error (its message is on stderr).

    """
    # Imported here: grpcio-tools is a development dependency, absent on agents.
    from grpc_tools import protoc

    # The well-known types (empty, timestamp, field_mask) ship inside grpcio-tools.
    well_known = resources.files("grpc_tools") / "_proto"
    target = out_root / PACKAGE_DIR.relative_to(SOURCE_ROOT)
    target.mkdir(parents=True, exist_ok=True)
    argv = [
        "grpc_tools.protoc",
        f"--proto_path={SOURCE_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(argv) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(map(str, proto_files()))}")
    return sorted(target.glob("*_pb2*"))


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: parse ``--out`` and regenerate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SOURCE_ROOT,
                        help="source root to write into (default: the package's own)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        sys.stdout.write(f"{path}\n")


if __name__ == "__main__":
    main()
