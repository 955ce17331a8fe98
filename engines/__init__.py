"""docroute.engines."""
