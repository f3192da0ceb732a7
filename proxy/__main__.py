"""`python -m proxy` is the `gatehouse` command."""

import sys

from proxy.tools.cli import main

sys.exit(main())
