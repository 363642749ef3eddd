"""What the agent and the cloud share: codecs, the rule language, the catalog, signing, errors.

Nothing here imports another fleetloop package (import-linter enforces it).
"""

__version__ = "0.1.0"
