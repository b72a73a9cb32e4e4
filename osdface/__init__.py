"""The `osdface` command line: weights, restore, serve, train."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("osdface-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
