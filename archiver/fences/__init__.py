"""Where archiver leans on other libraries' internals: Hypercorn's protocols and server, Quart-Trio's connection.

Each module adapts one private API, names the versions it was checked
against (pyproject.toml pins them), and tests/test_fences.py fails loudly if
an upgrade moves what it relies on.  Nothing here imports the rest of archiver but its
logging helpers (``logs``).  ``client_errors`` counts what the fences refused, for the metrics.
"""
