"""`python -m d2m_export.cli`: the command line, as the `d2m-export` script runs it."""
import sys

from d2m_export.cli import main

if __name__ == "__main__":
    sys.exit(main())
