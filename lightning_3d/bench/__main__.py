"""``python -m lightning_3d.bench [--quick] [--out DIR]``: the benchmark suite (see :mod:`lightning_3d.bench.suite`)."""

from lightning_3d.bench.suite import main

if __name__ == "__main__":
    main()
