"""Settings from the environment: the hypercorn launch's only input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from archiver.config import Settings, SettingsError, setting_name


def test_environment_overrides_defaults() -> None:
    settings = Settings.from_env(
        {
            "ARCHIVER_DIR": "/srv/photos",
            "ARCHIVER_DELAY": "0.5",
            "ARCHIVER_VERBOSE": "yes",
            "ARCHIVER_COMPRESSION": "6",
            "ARCHIVER_PORT": "9000",
            "UNRELATED": "x",
        }
    )
    assert settings == Settings(storage_dir=Path("/srv/photos"), delay=0.5, verbose=True, compression=6, port=9000)


def test_empty_environment_gives_defaults() -> None:
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(
    "variable, value",
    [
        ("ARCHIVER_COMPRESSION", "10"),
        ("ARCHIVER_DELAY", "-1"),
        ("ARCHIVER_PORT", "http"),
        ("ARCHIVER_VERBOSE", "maybe"),
        # Values that passed and then failed every download or the shutdown (helper 34).
        ("ARCHIVER_DELAY", "nan"),
        ("ARCHIVER_DELAY", "inf"),
        ("ARCHIVER_SHUTDOWN_GRACE", "nan"),
        ("ARCHIVER_CHUNK_SIZE", "99999999999"),
        ("ARCHIVER_CHANNEL_CAPACITY", "1000000"),
        ("ARCHIVER_DELAY", "1e308"),  # helper 36
        ("ARCHIVER_STORAGE_TIMEOUT", "1e-300"),
        ("ARCHIVER_STALL_TIMEOUT", "1e-300"),  # helper 46: every answer cut as stalled
        ("ARCHIVER_STALL_TIMEOUT", "0.5"),
        ("ARCHIVER_STALL_TIMEOUT", "nan"),
        ("ARCHIVER_MAX_FILES", "0"),
        ("ARCHIVER_MAX_FILES", "many"),
        # Helper 73: read by int() and float() as 10, 2 and (rounded to 0 ns) off.
        ("ARCHIVER_SETTLE_TIME", "1_0"),
        ("ARCHIVER_SETTLE_TIME", "\uff12"),
        ("ARCHIVER_MAX_JOBS", "1_0"),
        ("ARCHIVER_PORT", "\u0668\u0660"),
        ("ARCHIVER_SETTLE_TIME", "1e-10"),
        # Helper 74: spaces of other scripts, and a dotless i.
        ("ARCHIVER_CHUNK_SIZE", "\u3000100"),
        ("ARCHIVER_SETTLE_TIME", "\u0131nf"),
        # Helper 76: a float's underflow to 0.0 turned the settle rule off unsaid.
        ("ARCHIVER_SETTLE_TIME", "1e-400"),
        # Helper 149: two types a space apart were one type that never matched.
        ("ARCHIVER_TRUSTED_FUSE", "fuse.mergerfs virtiofs"),
        # Helper 171: lower than ARCHIVER_MAX_FILES, and taken unsaid for the default (1000000).
        ("ARCHIVER_MAX_PLANNED_FILES", "0"),
        ("ARCHIVER_MAX_PLANNED_FILES", "00"),
        ("ARCHIVER_OEM_NAMES", "cp866"),
    ],
)
def test_bad_values_are_refused_with_their_name(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"(^| or ){variable}[ =:]"):
        Settings.from_env({variable: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timezone", "Mars/Olympus"),
        ("name_encoding", "rot13"),
        ("name_encoding", "no-such"),
        # Encodings that do not read ASCII as ASCII: a name's bytes could read as "../" (helper 35).
        ("name_encoding", "cp037"),
        ("name_encoding", "utf-7"),
        ("name_encoding", "utf-16"),
        ("name_encoding", "idna"),  # cannot replace what it cannot read (helper 36)
        ("name_encoding", "punycode"),
        ("name_encoding", "undefined"),
        ("trusted_proxies", ("10.0.0.0/8", "proxy.example")),
    ],
)
def test_a_zone_encoding_or_proxy_the_service_cannot_use_fails_at_start_naming_its_variable(
    field: str, value: object
) -> None:
    # Helper 103: "timezone: 'Mars/Base' ..." named no variable an operator sets.
    with pytest.raises(SettingsError, match=f"^ARCHIVER_{field.upper()}: "):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_the_zones_are_had_where_the_system_has_no_tz_database() -> None:
    # A slim container has no /usr/share/zoneinfo: the default UTC failed at start (helper 96).
    check = (
        "from archiver.config import Settings; from archiver.archive.entries import load_zone; "
        "Settings(); print(load_zone('Europe/Moscow')[0].utcoffset(None) is None)"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], env={**os.environ, "PYTHONTZPATH": ""}, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout == "True\n", done.stderr


README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readmes_settings_table_names_every_variable_with_the_codes_default() -> None:
    # Helper 178: the operators' manual is the table under Running; a variable it leaves out, or a
    # default that drifted from the code's, is a setting an operator cannot know or gets wrong.
    running = README.read_text().split("### `archiver` / `python -m archiver`")[1].split("\n### ")[0]
    rows = re.findall(r"^\|[^|\n]*\| `(ARCHIVER_[A-Z0-9_]+)` \| ([^|\n]+) \|", running, re.MULTILINE)
    documented = dict(rows)
    assert len(documented) == len(rows), "a variable has two rows"
    variables = {setting_name(field.name).split()[-1] for field in fields(Settings)}
    assert set(documented) == variables
    for variable, default in documented.items():
        # "`8080`", "off", "empty", "1000000, or `ARCHIVER_MAX_FILES` if more": as the variable would say it.
        text = "" if default.strip() == "empty" else default.split(",")[0].strip().strip("`")
        if variable == "ARCHIVER_TRUSTED_PROXIES":
            text = default.strip().strip("`")
        given = Settings.from_env({variable: text})
        if variable == "ARCHIVER_MAX_PLANNED_FILES":  # unset, it follows ARCHIVER_MAX_FILES up
            assert given.planned_files_budget == Settings().planned_files_budget, variable
        else:
            assert given == Settings(), (variable, default)
