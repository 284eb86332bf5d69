"""``python -m benchmarks``: the throughput suite (benchmarks/suite.py)."""

from .suite import main

if __name__ == "__main__":
    main()
