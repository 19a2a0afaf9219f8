"""Hypothesis profiles.

``ci`` (default): derandomized, so CI is deterministic.  ``soak``: random and
long; run it with ``HYPOTHESIS_PROFILE=soak python -m pytest tests/test_sim_properties.py``
and turn every failure it finds into an ``@example`` or a seeded regression test.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=200, print_blob=True, **_common)
settings.register_profile("soak", derandomize=False, max_examples=3000, print_blob=True, **_common)
settings.register_profile("dev", derandomize=False, max_examples=30, print_blob=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
