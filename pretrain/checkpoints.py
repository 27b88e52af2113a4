"""List a run's checkpoints: `python -m pretrain.checkpoints RUN_DIR [--verify] [--json]`.

One row per checkpoint in RUN_DIR/checkpoints/, newest first: step, tokens, when it was saved, world
size, size on disk, and its state: `complete` (its manifest is there and every file has the size the
manifest records: the resume's own check, pretrain/checkpoint/choice.py's `verify`, hashes aside),
`damaged: <the first problem>`, or `partial` (a save that never finished: never
loaded). --verify also checks every file's SHA-256 against the manifest (reads all the bytes), which
is what a resume does before it trusts one. The newest complete one is marked `<- resume`: it is the
one `resume=auto` would try first. Exit 0; 2 when RUN_DIR has no checkpoints folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.checkpoint import choice
from pretrain.checkpoint.files import entries
from pretrain.checkpoint.store import PARTIAL, ckpt_dir


def _step(name: str) -> int | None:
    stem = name[: -len(PARTIAL)] if name.endswith(PARTIAL) else name
    return int(stem[4:]) if stem.startswith("step") and stem[4:].isdigit() else None


def size_of(directory: Path) -> int:
    return sum((directory / name).lstat().st_size for name in entries(directory))  # links not followed


def describe(directory: Path, verify: bool) -> dict:
    row = {"tag": directory.name, "step": _step(directory.name), "tokens": None, "time": None, "world_size": None,
           "bytes": size_of(directory)}
    if directory.name.endswith(PARTIAL):
        return {**row, "state": "partial"}
    # The resume's own verdict (choice.verify); without --verify, the hashes are left out.
    problem, manifest = choice.verify(directory, None if verify else (lambda names: []))
    if manifest is not None:
        row.update(step=manifest["step"], tokens=manifest.get("tokens"), time=manifest.get("time"),
                   world_size=manifest.get("world_size"))
    if problem is None and verify:
        row["verified_files"] = len(manifest["files"])
    return {**row, "state": "complete" if problem is None else f"damaged: {problem}"}


def list_checkpoints(run_dir: str | Path, verify: bool = False) -> list[dict]:
    root = ckpt_dir(str(run_dir))
    names = set(choice.candidates(root)) | {p.name for p in root.iterdir() if p.name.endswith(PARTIAL) and p.is_dir()
                                           and _step(p.name) is not None}
    rows = [describe(root / name, verify) for name in names]
    return sorted(rows, key=lambda r: (r["step"] or 0, r["state"] != "partial"), reverse=True)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def table(rows: list[dict]) -> str:
    resume = next((r["tag"] for r in rows if r["state"] == "complete"), None)
    fmt = "{:<22} {:>9} {:>13} {:<21} {:>5} {:>9}  {}"
    lines = [fmt.format("checkpoint", "step", "tokens", "saved (UTC)", "ranks", "size", "state")]
    for r in rows:
        lines.append(fmt.format(r["tag"], r["step"] if r["step"] is not None else "-",
                                f"{r['tokens']:,}" if r["tokens"] is not None else "-", r["time"] or "-",
                                r["world_size"] or "-", human_bytes(r["bytes"]),
                                r["state"] + ("   <- resume" if r["tag"] == resume else "")))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.checkpoints", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--verify", action="store_true", help="also check every file's SHA-256 (reads all bytes)")
    parser.add_argument("--json", action="store_true", help="one JSON object per checkpoint instead of a table")
    args = parser.parse_args(argv)
    if not ckpt_dir(args.run_dir).is_dir():
        print(f"error: {ckpt_dir(args.run_dir)}: no such folder (is {args.run_dir} a run directory?)", file=sys.stderr)
        sys.exit(2)
    rows = list_checkpoints(args.run_dir, args.verify)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(table(rows) if rows else f"no checkpoints in {ckpt_dir(args.run_dir)}")
        if args.verify:  # say what was checked: a table alone looks the same as without --verify
            verified = [r for r in rows if "verified_files" in r]
            print(f"verified the SHA-256 of {sum(r['verified_files'] for r in verified)} files in {len(verified)} "
                  f"complete checkpoint{'s' * (len(verified) != 1)}; {len(rows) - len(verified)} not complete")


if __name__ == "__main__":
    main(sys.argv[1:])
