import sys

from notelab.cli import main

sys.exit(main())
