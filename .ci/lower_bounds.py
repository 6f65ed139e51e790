"""Print a pip constraints file that pins each requirement pyproject.toml declares to its lower bound.

Usage: ``python .ci/lower_bounds.py [EXTRA ...] > lowest.txt``: the project's dependencies plus those of
the named extras, one ``name==version`` line for each ``name>=version`` bound. torch is left out: its
oldest allowed release on PyPI is a CUDA build of several GB, so the lower-bound run keeps the README's
CPU pin (installed before this file is applied).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

NOT_PINNED = {"torch"}
BOUND = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:[^;]*?,\s*)?>=\s*([^,;\s]+)")

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
for requirement in requirements:
    found = BOUND.match(requirement)
    if found is None:
        sys.exit(f"{requirement!r} has no >= lower bound to pin")
    name, version = found.groups()
    if name not in NOT_PINNED:
        print(f"{name}=={version}")
