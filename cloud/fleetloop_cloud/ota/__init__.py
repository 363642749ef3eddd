"""What a release is on the cloud side and how devices come to trust it: content-addressed images and
deltas (``artifact_store``), the TUF image repository and director metadata (``tuf_repository``, the
only cloud module importing tuf and securesystemslib), and the per-device director (``director``)."""
