"""Object storage: where the fleet store's table files and the upload staging's pieces live.

One narrow interface (:class:`~.objects.ObjectStore`: put, get, delete, list under a prefix), shaped by
what its users need — whole objects written once and replaced by name, never appended to — so a local
folder (the embedded default), an in-memory fake and an S3-compatible bucket (:mod:`.s3`, the only
module importing an S3 client) all serve it alike. :func:`open_object_store` picks one from the
configuration.
"""

from fleetloop_cloud.storage.objects import (
    LocalObjectStore,
    MemoryObjectStore,
    ObjectInfo,
    ObjectStore,
    S3Settings,
    check_key,
    copy_objects,
    open_object_store,
)

__all__ = [
    "LocalObjectStore",
    "MemoryObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "S3Settings",
    "check_key",
    "copy_objects",
    "open_object_store",
]
