"""The firmware image format, as the agent reads it
(defined in :mod:`fleetloop_shared.update.firmware_image`).

The format moved to the shared package so the cloud can refuse an upload whose header names other
hardware or another version before anything is signed; the agent keeps importing it from here.
"""

from __future__ import annotations

from fleetloop_shared.update.firmware_image import (
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    ImageInfo,
    image_info,
    pack_image,
)

__all__ = ["FORMAT_VERSION", "MAGIC", "MAX_HEADER_BYTES", "ImageInfo", "image_info", "pack_image"]
