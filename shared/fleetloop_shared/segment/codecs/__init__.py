"""Column codecs of the segment format: bit packing, integer streams, decimal and grid floats, text.

Pure functions over numpy arrays and bytes; :mod:`fleetloop_shared.segment` frames their output into
blocks. Every decoder here raises :class:`StreamError` on malformed bytes, and only that: the segment's
codec registry turns it into a ``CorruptSegmentError`` naming the block, in one place.
"""


class StreamError(ValueError):
    """Malformed codec bytes (the segment decoder turns it into CorruptSegmentError, naming the block)."""
