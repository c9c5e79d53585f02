"""jlocalmap's benchmark harness: ``python -m benchmarks [--quick]`` from a checkout.

Modules: ``run`` (the command line), ``workloads`` (the JAX programs compared),
``timing`` (interleaved rounds, statistics, the progress bar), ``report`` (table,
targets, JSON and plots), ``torch_rows`` (PyTorch DTensor ``local_map`` rows,
run in their own torchrun launch). See docs/benchmarks.md.

Nothing here imports JAX at package import: ``run`` sets ``XLA_FLAGS`` first.
"""
