"""docroute.flows."""
