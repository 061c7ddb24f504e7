"""``python -m bench [--quick] [--reps N] [--only NAME,...] [--workers N] [--json PATH] [--scale]``"""

from bench.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
