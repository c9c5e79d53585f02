"""The region stage: the named ``jax.shard_map`` program, its outputs, names, records and gradient rules."""
