"""How devices' uploads reach ingest: the upload scheduler (pure: budgets and grants, ``now`` passed in)
and the staging of resumable uploads on disk."""
