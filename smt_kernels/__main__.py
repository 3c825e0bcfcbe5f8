"""``python -m smt_kernels``: the ``smt-kernels`` command line."""

import sys

from smt_kernels.cli import main

sys.exit(main())
