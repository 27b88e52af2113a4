"""What a config value may hold where `python -m launch.submit` writes it into the batch script.

Every value that reaches launch/slurm/pretrain.sbatch is checked here against a character set of its
own field (an allow-list: a SLURM partition is letters, digits and `_ . , -`, never a newline), and is
refused in one line naming the key and showing the value with repr(). A newline in a #SBATCH value
would start a line of its own, which bash runs; a quote or `#` would end the value early for sbatch's
own parser. What passes is also shell-quoted where it is written (shlex.quote: a no-op on the plain
values, so the script reads as typed).

Two fields are shell by design and are only kept to printable characters on one line: the
`cluster.slurm.setup` lines (they run as written, before the launch) and the Hydra overrides, which
are passed on quoted. Environment values are free text, quoted.
"""

from __future__ import annotations

import re

from pretrain.config import ConfigError

# Field -> (allowed characters as a regex class, what the field is: for the message).
PARTITION = (r"A-Za-z0-9_.,\-", "a SLURM partition name, or several separated by commas")
ACCOUNT = (r"A-Za-z0-9_.\-", "a SLURM account name")
CONSTRAINT = (r"A-Za-z0-9_.,:&|*\[\]()\-", "SLURM features joined by & | , * [ ] ( )")
JOB_NAME = (r"A-Za-z0-9_.+\-", "one word of letters, digits, . + - _")
PATH = (r"\w@%+=:,./~\-", "a path of letters, digits and _ @ % + = : , . / ~ -")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SBATCH_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9\-]*")


def check_chars(key: str, value: str, field: tuple[str, str]) -> str:
    """`value` if it is non-empty and made only of the field's characters, else a ConfigError."""
    chars, what = field
    if not isinstance(value, str) or re.fullmatch(f"[{chars}]+", value) is None:
        raise ConfigError(f"{key}={value!r}: not {what}; refusing to write it into the batch script")
    return value


def check_line(key: str, value: str) -> str:
    """Free text that is written quoted (or is shell by design): printable characters on one line."""
    if not isinstance(value, str) or not value.isprintable():
        raise ConfigError(f"{key}={value!r}: has a newline or control character; refusing to write it into the "
                          f"batch script")
    return value


def check_int(key: str, value) -> int:
    if type(value) is not int:  # a bool is an int to Python, never to sbatch
        raise ConfigError(f"{key}={value!r}: not a whole number")
    return value


def check_overrides(overrides: list[str]) -> None:
    """The command line's overrides travel to every rank inside the script: one line each."""
    for override in overrides:
        key, _, value = override.partition("=")
        check_line(key if key.isprintable() else "an override", value or key)


def check_sbatch_extra(options: list[str]) -> None:
    for opt in options:
        name, eq, value = opt.partition("=")
        if SBATCH_OPTION.fullmatch(name) is None or (eq and not value):
            raise ConfigError(f"cluster.slurm.sbatch_extra: {opt!r} is not one sbatch long option (--name=value)")
        check_line("cluster.slurm.sbatch_extra", opt)


def check_env(env: dict) -> None:
    for name, value in env.items():
        if not isinstance(name, str) or ENV_NAME.fullmatch(name) is None:
            raise ConfigError(f"cluster.slurm.env.{name!r}: not a valid environment variable name")
        check_line(f"cluster.slurm.env.{name}", str(value))
