"""Serve the lycotrain GUI: ``python app.py [--host H] [--port P] [--auth USER:PASS] [--share] [--runs DIR]``
(the same as ``lycotrain app``)."""

import sys

from lycotrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
