"""`python -m loyaltysync`."""

from loyaltysync.cli import main

raise SystemExit(main())
