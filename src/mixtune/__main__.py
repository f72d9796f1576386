import sys

from mixtune.cli import main

sys.exit(main())
