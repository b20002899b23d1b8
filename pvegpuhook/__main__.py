"""``python3 -m pvegpuhook`` behaves like the installed ``pve-gpu-hook`` command."""

import sys

from pvegpuhook.cli import main

sys.exit(main())
