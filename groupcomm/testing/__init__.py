"""Testing tools: a deterministic simulated cluster and the EVS checker.

Users test their own code under partitions with the same harness the library
uses for itself::

    from groupcomm.testing import SimCluster
    sim = SimCluster(nodes=5, seed=1)
    sim.run(1.0)
    sim.partition([{1, 2}, {3, 4, 5}])
    ...
    sim.check()
"""

from groupcomm.testing.evs import SendRecord, check_evs, evs_violations
from groupcomm.testing.sim import SimCluster

__all__ = ["SimCluster", "SendRecord", "check_evs", "evs_violations"]
