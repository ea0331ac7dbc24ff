"""dschat's T9K backend: DeepSpeedJobs through the Kubernetes API."""
