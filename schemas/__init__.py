"""docroute.schemas."""
