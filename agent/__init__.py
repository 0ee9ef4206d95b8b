"""pacsgw: edge storage gateway for hospital PACS."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pacsgw")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
