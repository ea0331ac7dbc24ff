"""dschat-adapter-local: run dschat training on this machine."""
