"""Bundled example corpora and job files; data only, kept importable so `docroute demo` finds them when installed."""
