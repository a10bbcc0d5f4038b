import sys

from qflare.cli import main

sys.exit(main())
