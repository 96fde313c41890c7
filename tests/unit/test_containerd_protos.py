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
    assert stems == {"content", "cri", "descriptor", "diff", "images", "leases", "mount",
                     "snapshots"}
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


def test_snapshots_and_diff_wire_numbers_are_containerds() -> None:
    # containerd api/services/snapshots/v1/snapshots.proto, diff/v1/diff.proto and
    # api/types/mount.proto: package names and field numbers are the wire contract.
    from layercache.containerd.protos import diff_pb2, mount_pb2, snapshots_pb2

    def numbers(message: object) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"].full_name == (
        "containerd.services.snapshots.v1.Snapshots")
    assert diff_pb2.DESCRIPTOR.services_by_name["Diff"].full_name == (
        "containerd.services.diff.v1.Diff")
    assert numbers(snapshots_pb2.PrepareSnapshotRequest) == {
        "snapshotter": 1, "key": 2, "parent": 3, "labels": 4}
    assert numbers(snapshots_pb2.CommitSnapshotRequest) == {
        "snapshotter": 1, "name": 2, "key": 3, "labels": 4}
    assert numbers(snapshots_pb2.Info) == {
        "name": 1, "parent": 2, "kind": 3, "created_at": 4, "updated_at": 5, "labels": 6}
    assert numbers(snapshots_pb2.UpdateSnapshotRequest) == {
        "snapshotter": 1, "info": 2, "update_mask": 3}
    assert numbers(snapshots_pb2.ListSnapshotsRequest) == {"snapshotter": 1, "filters": 2}
    assert snapshots_pb2.Kind.Value("COMMITTED") == 3
    assert snapshots_pb2.Kind.Value("ACTIVE") == 2
    assert numbers(mount_pb2.Mount) == {"type": 1, "source": 2, "target": 3, "options": 4}
    assert numbers(diff_pb2.ApplyRequest) == {"diff": 1, "mounts": 2}
    assert numbers(diff_pb2.ApplyResponse) == {"applied": 1}
