"""`python -m mobile.cli ...`, as the `mobile` command."""

import sys

from mobile.cli import main

sys.exit(main())
