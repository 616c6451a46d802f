"""`python -m tftransfer` runs the command line."""

from tftransfer.cli import main

main()
