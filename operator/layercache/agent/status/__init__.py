"""What the agent reports and guards: NodeLayerCache status and the node's disk.

- `report`: `StatusBook` and `StatusReporter`, the NodeLayerCache status writer.
- `disk`: `DiskGuard`, pausing fetches under disk pressure.
- `disksavings`: `DiskMeter`, the disk the cache uses and saves.
- `kubelet`: the kubelet's own view of the node's image filesystem.
"""
