"""python -m lowrank ...: the same as the `lowrank` command."""

import sys

from .cli import main

sys.exit(main())
