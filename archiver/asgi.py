"""The app for ``hypercorn --config hypercorn.toml archiver.asgi:app``, set up from ARCHIVER_* variables."""

import sys
from collections.abc import Callable, Coroutine
from typing import Any

from .fences import held_signals

# First: Hypercorn already listens, and the imports below take ~0.3 s.  A stop signal meanwhile is
# held until the lifespan's receiver takes it (and then is a graceful stop).
held_signals.hold()

import trio  # noqa: E402
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope  # noqa: E402

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


NOT_TRIO = (
    "archiver: runs on Hypercorn's trio worker only: hypercorn --config hypercorn.toml archiver.asgi:app "
    "(or --worker-class trio)"
)


AsgiApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Coroutine[Any, Any, None]]


def on_trio_only(asgi_app: AsgiApp) -> AsgiApp:
    """``asgi_app``, refusing to start under another of Hypercorn's workers than trio.

    Hypercorn's default worker (asyncio, without hypercorn.toml's
    ``worker_class``) or uvloop started the app, said "Running on", and then
    answered every request, /healthz's too, with a 500 and a traceback of
    Quart-Trio's (helper 171).  The lifespan's start comes first, before any
    request: it fails there, and Hypercorn stops (each worker's, with workers).
    """

    async def asgi(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":  # Hypercorn's every worker starts with it; the requests are left alone
            try:
                trio.lowlevel.current_trio_token()
            except RuntimeError:  # not in Trio
                # One line (exit 1 with workers = 0), as a setting refused at the import above: no traceback.
                raise SystemExit(NOT_TRIO) from None
        await asgi_app(scope, receive, send)

    return asgi


app.asgi_app = on_trio_only(app.asgi_app)  # type: ignore[method-assign, assignment]

# SIGTERM, SIGINT and SIGHUP shut Hypercorn down gracefully when it runs the app in its own process (workers = 0).
hypercorn_signals.install()


@app.before_serving
async def _stop_gracefully_on_a_stop_signal() -> None:
    app.nursery.start_soon(hypercorn_signals.terminate_on_stop_signal)
