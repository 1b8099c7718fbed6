"""`python -m gateway` is `mme-gateway`."""

import sys

from gateway.cli import main

sys.exit(main())
