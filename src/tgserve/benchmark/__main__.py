"""`python -m tgserve.benchmark`: the same command as `tgserve benchmark`."""

from tgserve.benchmark.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
