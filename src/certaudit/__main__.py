"""``python -m certaudit`` and ``torchrun -m certaudit ...``: the ``certaudit`` command line."""

import sys

from certaudit.cli import main

if __name__ == "__main__":
    sys.exit(main())
