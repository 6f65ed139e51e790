"""``python -m vpgtrans`` = the ``vpgtrans`` command (also ``torchrun -m vpgtrans ...``)."""

from vpgtrans.cli import main

main()
