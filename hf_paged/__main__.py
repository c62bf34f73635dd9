"""``python -m hf_paged``: the ``hf-paged`` command line."""

import sys

from hf_paged.cli import main

if __name__ == "__main__":
    sys.exit(main())
