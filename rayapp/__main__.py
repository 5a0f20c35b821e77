"""`python -m rayapp ...`: the same command line as the `rayapp` console script."""
import sys

from rayapp.cli import main

sys.exit(main())
