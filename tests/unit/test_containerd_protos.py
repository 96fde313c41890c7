"""The committed protobuf/gRPC modules are exactly what the generator makes of the protos."""

from __future__ import annotations

from pathlib import Path

import pytest

from layercache.containerd.protos import generate


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the test extra")
    written = generate.generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in written}
    committed = {p.name: p.read_bytes() for p in generate.PACKAGE_DIR.glob("*_pb2*")}
    assert sorted(fresh) == sorted(committed), "a generated module is missing or stale"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, (
        f"{stale} differ from the generator's output: run "
        "`python -m layercache.containerd.protos.generate` with the pinned grpcio-tools")


def test_every_proto_is_compiled() -> None:
    stems = {p.stem for p in generate.proto_files()}
    assert stems == {"content", "cri", "descriptor", "images", "leases"}
    for stem in stems:
        assert (generate.PACKAGE_DIR / f"{stem}_pb2.py").exists()
        assert (generate.PACKAGE_DIR / f"{stem}_pb2.pyi").exists()


def test_wire_names_and_field_numbers_are_containerds() -> None:
    # A sample of FACTS.md's table: the package and field numbers are the wire contract.
    from layercache.containerd.protos import content_pb2, cri_pb2, leases_pb2

    write = content_pb2.WriteContentRequest.DESCRIPTOR
    assert write.full_name == "containerd.services.content.v1.WriteContentRequest"
    numbers = {f.name: f.number for f in write.fields}
    assert numbers == {"action": 1, "ref": 2, "total": 3, "expected": 4, "offset": 5,
                       "data": 6, "labels": 7}
    assert content_pb2.DESCRIPTOR.services_by_name["Content"].full_name == (
        "containerd.services.content.v1.Content")
    assert leases_pb2.DESCRIPTOR.services_by_name["Leases"].full_name == (
        "containerd.services.leases.v1.Leases")
    image = {f.name: f.number for f in cri_pb2.Image.DESCRIPTOR.fields}
    assert (image["id"], image["repo_tags"], image["size"], image["pinned"]) == (1, 2, 4, 8)
    assert cri_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name == (
        "runtime.v1.ImageService")
