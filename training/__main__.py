"""`python -m training pretrain|export ...`"""
import sys

from aet.cli import main

sys.exit(main(commands=("pretrain", "export")))
