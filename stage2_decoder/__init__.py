"""Stage 2 (`decoder`): train, evaluate and export SAM's mask decoder from a samcache cache.

Never builds the image encoder; meets stage 1 only through the cache format in ``shared``.
"""
