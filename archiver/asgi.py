"""The app for ``hypercorn --config hypercorn.toml archiver.asgi:app``, set up from ARCHIVER_* variables."""

from .app import create_app
from .config import Settings
from .logs import configure_logging

settings = Settings.from_env()
configure_logging(settings.verbose)
app = create_app(settings)
