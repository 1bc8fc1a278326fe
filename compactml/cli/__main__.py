"""``python -m compactml.cli``: the same as the ``compactml`` command."""

import sys

from compactml.cli import main

sys.exit(main())
