"""genrec: generative recommendation with semantic IDs over a moving catalogue."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("genrec")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
