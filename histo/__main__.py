"""``python -m histo``: the ``lungmets`` command."""

import sys

from histo.cli import main

if __name__ == "__main__":
    sys.exit(main())
