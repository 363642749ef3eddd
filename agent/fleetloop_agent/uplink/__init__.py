"""A device's link to the cloud: one driver (:mod:`.link`) around a pure uploader core (:mod:`.uploader`),
over one transport seam (:mod:`.transport`) with gRPC, MQTT 5 and in-process adapters.

The adapters are imported from their own modules (``fleetloop_agent.uplink.grpc_transport`` …), so a
process that uses one transport never imports the other's library.
"""

from fleetloop_agent.uplink.device_messages import Greeting, heartbeat
from fleetloop_agent.uplink.link import Link, LinkLoop
from fleetloop_agent.uplink.pacing import LINK_BACKOFF, Backoff, BackoffPolicy
from fleetloop_agent.uplink.transport import ControlSession, UplinkTransport
from fleetloop_agent.uplink.uploader import Uploader
from fleetloop_shared.networks import NETWORKS

__all__ = [
    "LINK_BACKOFF",
    "NETWORKS",
    "Backoff",
    "BackoffPolicy",
    "ControlSession",
    "Greeting",
    "Link",
    "LinkLoop",
    "UplinkTransport",
    "Uploader",
    "heartbeat",
]
