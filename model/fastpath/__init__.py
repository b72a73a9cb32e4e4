"""The restorer's fast path: speed-ups that compute the plain path's function."""
