"""``python -m virtnet``: the ``virtnet`` command line (:func:`virtnet.cli.main`)."""

import sys

from virtnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
