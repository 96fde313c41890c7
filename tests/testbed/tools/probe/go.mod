// The bed's in-cluster probe: a static client of the apiserver and a port holder, run in pods.
module layercache.dev/testbed/tools/probe

go 1.26.0
