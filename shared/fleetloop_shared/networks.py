"""The networks a device says it is on (``Heartbeat.network``): one vocabulary for both ends.

A device reports one of these with every heartbeat; the cloud's upload scheduler budgets bytes per
network (cellular costs money, the rest does not), so a name the agent may send and a name the cloud
budgets for must be the same list, kept here.
"""

from __future__ import annotations

from typing import Final

#: What ``Heartbeat.network`` may say; ``other`` covers any link the device cannot name.
NETWORKS: Final = ("wifi", "cellular", "ethernet", "other")
