// The bed's pod sandbox ("pause") binary: a static program that waits for SIGTERM.
module layercache.dev/testbed/tools/pause

go 1.26.0
