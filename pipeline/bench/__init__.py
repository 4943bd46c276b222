"""Benchmarks, three jobs each usable alone, all over the product's own configs and code paths:

- `workloads`: `make bench`'s throughput: each training stage's `fit_*`, and generation, on fixed workloads;
- `memory`: the peak memory of one DPO step at a real vocabulary, through `DPOModule`;
- `gpu`: `make gpu-check`'s overrides of the `gpu` preset and the figures it reads off each stage's report.
"""
