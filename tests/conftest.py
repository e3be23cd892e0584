"""Suite-wide settings: property tests are derandomised so that CI failures reproduce.

Hypothesis (and schemathesis, built on it) draws its examples from a seed derived from each
test's source (`derandomize=True`): the same examples on every run and every machine, and a
failure prints the example and the `@reproduce_failure` blob to replay it.  Set
`HYPOTHESIS_PROFILE=explore` to draw new examples instead (locally, to look for new bugs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def _close_decoder_pools() -> Iterator[None]:
    """Stop the image decoder children of every runtime a test module built, when the module
    ends: runtimes are rarely closed by tests, and their children (one interpreter each) would
    otherwise pile up over a full run until the garbage collector reaches them."""
    from guardrail.service.decoders import DecoderPool

    built: list[DecoderPool] = []
    original = DecoderPool.__init__

    def recording(self: DecoderPool, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        built.append(self)

    DecoderPool.__init__ = recording  # type: ignore[method-assign]
    try:
        yield
    finally:
        DecoderPool.__init__ = original  # type: ignore[method-assign]
        for pool in built:
            pool.close()
