"""`python -m igds_fast ...`: the same command line as the `igds-fast` console script."""
import sys

from igds_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
