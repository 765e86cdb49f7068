import sys

from diffdistill.cli import main

sys.exit(main())
