"""`python -m aet.server serve ...`"""

import sys

from aet.cli import main

sys.exit(main(commands=("serve",)))
