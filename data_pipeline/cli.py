"""The command lines of the data_pipeline entry points: `--help` and unknown flags are handled
before any work (Hydra overrides are plain `key=value` words, so anything starting with `-` other
than -h/--help is an error, never a file name or an override)."""

from __future__ import annotations

import argparse

from data_pipeline.config import CONF_DIR


def config_reference(*groups: tuple[str, str]) -> str:
    """The commented default files of config groups, e.g. ("data", "files"): the keys a command
    takes, with what each means, straight from conf/ (the one place where defaults live)."""
    parts = []
    for group, name in groups:
        path = CONF_DIR / group / f"{name}.yaml"
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        parts.append(f"{group}.* (conf/{group}/{name}.yaml):\n" + "\n".join("  " + line for line in lines))
    return "\n\n".join(parts)


def parser(prog: str, doc: str, epilog: str = "") -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.strip(), epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides of the shared config tree (conf/), e.g. data=files data.inputs=[corpus/]")

