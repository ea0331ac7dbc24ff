"""The stages. Each module holds only what differs; the run chassis is dschat_core.training.run."""
