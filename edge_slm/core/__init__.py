"""Device-safe foundations (stdlib and numpy only): the bundle contract, hashing, atomic writes,
target profiles, system information, the onnxruntime capability table and the shipped texts.
Both halves import this package; it imports neither of them."""
