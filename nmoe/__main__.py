import sys

from nmoe.cli import main

sys.exit(main())
