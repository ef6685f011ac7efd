"""``python -m dropcluster`` (and ``torchrun -m dropcluster``): the ``dropcluster`` command."""

from dropcluster.cli import main

raise SystemExit(main())
