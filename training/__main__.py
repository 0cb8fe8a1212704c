"""`python -m aet.training pretrain|export ...`"""

import sys

from aet.cli import main

sys.exit(main(commands=("pretrain", "export")))
