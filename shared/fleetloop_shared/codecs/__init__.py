"""Column codecs of the segment format: bit packing, integer streams, decimal (ALP-style) floats.

Pure functions over numpy arrays; ``fleetloop_shared.segment`` frames their output into blocks.
"""
