"""``python -m tclora``: the ``tclora`` command (:func:`tclora.cli.main`)."""

import sys

from tclora.cli import main

if __name__ == "__main__":
    sys.exit(main())
