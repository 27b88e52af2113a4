"""The files of a Hugging Face model folder (an export, or a causal LM for model.init_from), read
without trusting the names in them.

config.json, the shard index and the weight files it names are read through
data_pipeline/confined.py with the folder as root: inside it after realpath (a folder that is itself a
symlink is fine), regular files only, JSON and safetensors headers with a size cap, and nothing of a
file's content in a message. A safetensors header (8-byte length, then JSON) is read by itself, so a
folder's names and shapes are known before any tensor is read or any model is built.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from data_pipeline.confined import UnsafeFileError, inside, open_regular, read_capped

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG_MAX_BYTES = 1 << 20  # a config.json is a few KB
INDEX_MAX_BYTES = 64 << 20  # a weight map: one line per tensor
HEADER_MAX_BYTES = 16 << 20  # an 8B model's header is ~30 KB; safetensors itself allows up to 100 MB
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # named when they are all a folder has, never read


class FormatError(ValueError):
    """A Hugging Face folder that is not a LLaDA model this framework can build, or not the one asked for."""


def read_json(folder: str | Path, name: str, max_bytes: int, what: str) -> dict:
    """A JSON object from `folder/name`, or a one-line FormatError naming the file (never its content)."""
    path = Path(folder) / name
    try:
        data = json.loads(read_capped(folder, name, max_bytes))
    except FileNotFoundError:
        raise FormatError(f"{folder}: no {name} ({what})") from None
    except UnsafeFileError as e:
        raise FormatError(str(e)) from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a JSON object")
    return data


def weights_path(folder: str | Path, name: str, why: str = "the weights name it") -> Path:
    """The real path of a file the folder names (a weight file, its tokenizer): inside the folder and a
    regular file."""
    try:
        with open_regular(folder, name):
            pass
        return inside(folder, name)
    except FileNotFoundError:
        raise FormatError(f"{folder}: no {name} ({why})") from None
    except UnsafeFileError as e:
        raise FormatError(str(e)) from None


def read_header(folder: str | Path, name: str) -> dict[str, list[int]]:
    """tensor name -> shape, from a safetensors file's header alone (at most HEADER_MAX_BYTES read)."""
    path = Path(folder) / name
    try:
        with open_regular(folder, name) as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: shorter than a safetensors header")
            (size,) = struct.unpack("<Q", head)
            if size > HEADER_MAX_BYTES:
                raise FormatError(f"{path}: a safetensors header of {size} bytes (more than {HEADER_MAX_BYTES}); "
                                  f"not a model file this framework reads")
            raw = f.read(size)
    except FileNotFoundError:
        raise FormatError(f"{folder}: no {name} (the weights name it)") from None
    except UnsafeFileError as e:
        raise FormatError(str(e)) from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FormatError(f"{path}: the weights cannot be read (the safetensors header does not parse)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    shapes = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise FormatError(f"{path}: tensor {key[:80]!r} has no valid shape in the header")
        shapes[key] = shape
    return shapes


def weight_map(folder: str | Path) -> dict[str, str]:
    """Tensor name -> the file that holds it: the sharded index (size-capped), or one model.safetensors."""
    folder = Path(folder)
    if (folder / INDEX).exists() or (folder / INDEX).is_symlink():
        index = read_json(folder, INDEX, INDEX_MAX_BYTES, "the shard index")
        mapping = index.get("weight_map")
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise FormatError(f"{folder / INDEX}: no weight_map of tensor name -> file")
        return mapping
    if (folder / WEIGHTS).exists() or (folder / WEIGHTS).is_symlink():
        return {name: WEIGHTS for name in read_header(folder, WEIGHTS)}
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    hint = "" if not pickled else (
        f"; {pickled[0]} is pickled, which can run code when loaded, so it is not read: save the weights as "
        f"safetensors (transformers: save_pretrained(..., safe_serialization=True))")
    raise FormatError(f"{folder}: neither {WEIGHTS} nor {INDEX}{hint}")


def header_shapes(folder: str | Path, mapping: dict[str, str]) -> dict[str, list[int]]:
    """Tensor name -> shape for every tensor of `mapping`, from the headers of its files (each read once)."""
    headers = {file: read_header(folder, file) for file in sorted(set(mapping.values()))}
    shapes = {}
    for name, file in mapping.items():
        if name not in headers[file]:
            raise FormatError(f"{Path(folder) / file}: holds no tensor {name[:80]!r} (the index names it there)")
        shapes[name] = headers[file][name]
    return shapes
