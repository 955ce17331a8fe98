"""docroute.tasks."""
