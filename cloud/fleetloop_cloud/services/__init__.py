"""The coordinator's services: what the surfaces (gRPC, MQTT, HTTP) call, each with the caller's
identity (:mod:`.access`) and, where it decides on time, ``now`` passed in. Transport-free: a surface
decodes its request, calls one service method and maps :mod:`fleetloop_shared.errors` to its own
status codes.

- :mod:`.devices` — the device's control stream, sessions and leases, and the fleet as operators see it;
- :mod:`.campaigns` — desired campaigns, validated with the agents' compiler and pushed;
- :mod:`.ingest` — segments into the fleet store exactly once, and the upload grants that pace them;
- :mod:`.releases` and :mod:`.rollouts` — releases signed for devices, and rollouts of them;
- :mod:`.query` — SQL over the fleet store, captures and the coordinator's summary.
"""
