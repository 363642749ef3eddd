"""What a release is and how it reaches a device: signed manifests, TUF metadata checks, firmware image
headers and binary deltas (made in the cloud, applied streaming on the device)."""
