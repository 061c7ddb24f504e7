"""Side-by-side benchmarks of pydra-actors against Dask distributed, Ray and a process pool.

``python -m bench --quick`` (or ``python -m bench`` for the full sizes) runs every workload on
every runtime in one process, one runtime at a time, and prints medians, ranges and the ratio of
pydra-actors to each peer. See ``bench/README.md`` for the workloads and the latest numbers.
"""
