"""The device runtime: sources, ring buffers, trigger engine, local store, uplink, OTA.

It knows the device only through its platform interface (``fleetloop_agent.ota.platform``) and never
imports the cloud or the simulator.
"""

__version__ = "0.1.0"
