"""``python -m icl.segment``, as documented: the command lives in :mod:`icl.cli.segment`."""
import os
import sys

from icl.cli.segment import main

if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    sys.exit(main())
