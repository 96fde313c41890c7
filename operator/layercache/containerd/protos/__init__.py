"""Generated gRPC/protobuf modules for containerd's and the CRI's APIs (do not edit).

The ``.proto`` files here are hand-written minimal copies of the upstream APIs (containerd
v1.6 ``api/services/{content,leases,images}/v1`` and ``api/types/descriptor.proto``;
Kubernetes ``k8s.io/cri-api`` ``runtime/v1``): public package names and field numbers
only, which is all the wire needs. ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` are
generated from them by ``python -m layercache.containerd.protos.generate`` and committed; a
unit test checks that regenerating gives the same bytes.
"""
