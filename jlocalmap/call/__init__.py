"""The call stage: a local_map call's arguments read once, checked and planned (static, hashable, no tracing)."""
