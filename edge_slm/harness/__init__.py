"""The host's tools around bundles: benchmarks over SSH on devices (`remote`), deploying and serving
on devices (`deploy`, `ssh`), Raspberry Pi CPUs under qemu emulation (`emulate`) and reports from
benchmark records (`report`). Nothing here runs on a device: the benchmark worker that does is
`edge_slm.runtime.bench`."""
