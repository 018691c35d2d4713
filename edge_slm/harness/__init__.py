"""Measuring bundles: benchmark records (`bench`), the same over SSH on devices (`remote`),
reports from records (`report`) and Raspberry Pi CPUs under qemu emulation (`emulate`).
Only `bench` runs on a device; it imports the runtime, never the build half."""
