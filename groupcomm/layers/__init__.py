"""The sans-IO protocol layers above the ring, composed by :class:`Member`.

Bottom to top: :mod:`~groupcomm.layers.multicast` (TOTEM + FRAG + FD),
:mod:`~groupcomm.layers.unicast` (beside the ring), :mod:`~groupcomm.layers.quorum`,
:mod:`~groupcomm.layers.spaces`, :mod:`~groupcomm.layers.rpc`, and
:mod:`~groupcomm.layers.member` composing them.  Every frame the layers put on
the network is declared and validated in :mod:`~groupcomm.layers.wire`.
Nothing here does I/O or imports trio: the trio :class:`~groupcomm.io.channel.Channel`
and :class:`~groupcomm.testing.SimCluster` both drive these objects.
"""

from groupcomm.layers.member import Member
from groupcomm.layers.multicast import Multicast

__all__ = ["Member", "Multicast"]
