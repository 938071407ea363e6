"""``python -m gateway`` runs the ``presence-gateway`` command."""

import sys

from gateway.cli import main

sys.exit(main())
