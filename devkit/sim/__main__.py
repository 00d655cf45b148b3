"""`python -m devkit.sim --seeds 1-100 --ops 1000`: play seeds, print one summary line (see devkit/sim/cli.py)."""

from devkit.sim.cli import main

raise SystemExit(main())
