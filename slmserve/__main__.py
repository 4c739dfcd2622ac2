"""``python -m slmserve`` is the ``slmserve`` command."""

from slmserve.cli import main

raise SystemExit(main())
