"""The three stages. Each module holds only what differs; the loop lives in dschat_core.training."""
