"""The engine: the Rust scheduler and per-request state, the model runner that
executes each step, and the loop that serves callers from a background thread."""
