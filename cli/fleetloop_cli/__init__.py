"""The ``fleetloop`` command: a thin CLI over every package; nothing imports it."""
