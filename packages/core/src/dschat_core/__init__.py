"""dschat-core: InstructGPT-style three-stage RLHF on DeepSpeed, with pluggable launch backends."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dschat-core")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
