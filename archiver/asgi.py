"""The app for ``hypercorn --config hypercorn.toml archiver.asgi:app``, set up from ARCHIVER_* variables."""

import sys

from .fences import held_signals

# First: Hypercorn already listens, and the imports below take ~0.3 s.  A stop signal meanwhile is
# held until the lifespan's receiver takes it (and then is a graceful stop).
held_signals.hold()

from .config import Settings, SettingsError, warn_of_unknown_variables  # noqa: E402
from .fences import hypercorn_signals  # noqa: E402
from .logs import configure_logging, detach_standard_streams  # noqa: E402
from .web.app import create_app  # noqa: E402

try:
    settings = Settings.from_env()
    detach_standard_streams()  # before Hypercorn makes its log handlers (at its first line, after this import)
    configure_logging(settings.verbose)
    # Hypercorn's in this launch (helper 103: an ARCHIVER_PORT in the env file was ignored unsaid).
    warn_of_unknown_variables(
        {
            "ARCHIVER_HOST": "hypercorn --bind",
            "ARCHIVER_PORT": "hypercorn --bind",
            "ARCHIVER_SHUTDOWN_GRACE": "graceful_timeout in hypercorn.toml",
        }
    )
    app = create_app(settings)
except SettingsError as error:
    # One line, as the CLI launch says it, not the traceback of Hypercorn's import of this module.
    sys.exit(f"archiver: {error}")

# SIGTERM, SIGINT and SIGHUP shut Hypercorn down gracefully when it runs the app in its own process (workers = 0).
hypercorn_signals.install()


@app.before_serving
async def _stop_gracefully_on_a_stop_signal() -> None:
    app.nursery.start_soon(hypercorn_signals.terminate_on_stop_signal)
