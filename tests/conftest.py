"""Suite-wide settings: property tests are derandomised so that CI failures reproduce.

Hypothesis (and schemathesis, built on it) draws its examples from a seed derived from each
test's source (`derandomize=True`): the same examples on every run and every machine, and a
failure prints the example and the `@reproduce_failure` blob to replay it.  Set
`HYPOTHESIS_PROFILE=explore` to draw new examples instead (locally, to look for new bugs).
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
