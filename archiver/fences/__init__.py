"""Where archiver leans on other libraries' internals: Hypercorn's protocols and server, Quart-Trio's connection.

Each module that patches adapts one private API, names the versions it was
checked against (pyproject.toml pins them), and tests/test_fences.py fails
loudly if an upgrade moves what it relies on.  Nothing here imports the rest of
archiver but its logging helpers (``logs``).  Three modules serve the patches
and adapt no API of their own: ``client_errors`` counts what the fences
refused, for the metrics; ``delivery`` tells the download what the patches saw
of bytes dropped; ``held_signals`` holds stop signals from a launch's first
moment until ``hypercorn_signals`` takes them.
"""
