"""``python -m neuralink ...``: the same as the ``neuralink`` command."""

import sys

from neuralink.cli import main

sys.exit(main())
