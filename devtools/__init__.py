"""Tools for developing and measuring datafs: throwaway SeaweedFS (S3) and
PostgreSQL servers, and the torch.compile worker process, that the tests and
the benchmarks start and stop.

Not part of the installed package (the wheel holds `datafs` only); import it
from the repository root, as `python3 -m pytest` and `python3 -m benchmarks` do.
"""
