"""docroute: batch document classification and extraction with a small model first, a frontier model only where needed.

The code lives in the top-level folders ``flows/``, ``tasks/``, ``schemas/`` and ``engines/``; packaging maps them to
``docroute.flows``, ``docroute.tasks``, ``docroute.schemas`` and ``docroute.engines`` so that installing docroute adds
one import name, not four generic ones.
"""

__version__ = "0.1.0"
