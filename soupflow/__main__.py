import sys

from soupflow.cli import main

sys.exit(main())
