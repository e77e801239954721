import sys

from eet.cli import main

sys.exit(main())
