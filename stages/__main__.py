import sys

from stages.cli import main

sys.argv[0] = "usnodule"
main()
