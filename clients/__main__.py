"""`python -m aet.clients embed|probe|head|predict|demo ...`"""

import sys

from aet.cli import main

sys.exit(main(commands=("embed", "probe", "head", "predict", "demo")))
