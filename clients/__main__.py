"""`python -m aet.clients embed|probe|demo ...`"""

import sys

from aet.cli import main

sys.exit(main(commands=("embed", "probe", "demo")))
