"""Hypothesis profiles.

``ci`` (default): derandomized, so CI is deterministic.  ``soak``: random and
long; run it with ``HYPOTHESIS_PROFILE=soak python -m pytest tests/test_sim_properties.py``
and turn every failure it finds into an ``@example`` or a seeded regression test.
``mutation``: derandomized and short, for tests/mutation.py.
"""

import atexit
import os
import shutil
import tempfile

from hypothesis import settings

from groupcomm.config.keys import new_key_file, write_key_file

# Members keep durable state (ring seqs, quorum memory) in a state directory;
# tests, and the member processes they start, keep theirs in a temporary one,
# never in the user's home.
_state = tempfile.mkdtemp(prefix="groupcomm-test-state-")
atexit.register(shutil.rmtree, _state, ignore_errors=True)
os.environ["GROUPCOMM_STATE_DIR"] = _state
os.environ["XDG_STATE_HOME"] = _state

# Members run with a cluster key, as they should anywhere but on a trusted network: every
# stack file reads it from GROUPCOMM_KEY_FILE (the CRYPTO layer), so the channels and the
# member processes of the tests seal every datagram.  Tests of the keyless mode say key_file="".
os.environ["GROUPCOMM_KEY_FILE"] = os.path.join(_state, "cluster.key")
write_key_file(os.environ["GROUPCOMM_KEY_FILE"], new_key_file())

# Health checks stay on: a strategy that draws too much or too slowly is to be fixed (see
# tests/strategies.py), not hidden; a test that truly needs it says so at the test.
_common = {"deadline": None}
settings.register_profile("ci", derandomize=True, max_examples=200, print_blob=True, **_common)
settings.register_profile("soak", derandomize=False, max_examples=3000, print_blob=True, **_common)
settings.register_profile("dev", derandomize=False, max_examples=30, print_blob=True, **_common)
# tests/mutation.py: every mutant runs the tests again, so fewer (still derandomized) examples
settings.register_profile("mutation", derandomize=True, max_examples=25, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
