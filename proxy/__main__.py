"""`python -m proxy` is the `gatehouse` command."""

import sys

from proxy.cli import main

sys.exit(main())
