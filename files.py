"""Files that never end half-written: atomic writes (temp file, then rename) and JSONL; and model
weights read with errors that name the file.

Every artefact of a run (checkpoints, STaR samples, reports) goes through `atomic_write`, so a
killed process leaves either the old file or the new one, never a torn one.
"""
import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


def atomic_write(dst, write_fn):
    """Call write_fn(tmp_path) then rename onto dst, so a crash never leaves a half-written file."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path) -> dict:
    """A JSON file; malformed (torn, hand-edited, not UTF-8): an error naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None


def write_json(path, obj):
    atomic_write(path, lambda f: Path(f).write_text(json.dumps(obj, indent=2)))


def read_jsonl(path):
    """Yield (line_number, object) from a JSONL file; a malformed line is an error naming it."""
    path = Path(path)
    with open(path, "rb") as f:  # bytes, decoded line by line, so a bad byte is named by its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def write_jsonl(path, rows):
    """Write rows atomically (temp file, then rename)."""
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    atomic_write(path, w)


# ----------------------------------------------------------------------------------------------
# model weights (safetensors), read with errors that name the file

def weight_files(path: Path) -> list:
    """The safetensors file(s) of an HF-format directory (one, or the shards its index names)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        return [path / s for s in sorted(set(read_json(index).get("weight_map", {}).values()))]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def read_safetensors(f: Path, header_only=False) -> dict:
    """A safetensors file's tensors (or only its header: the tensor offsets, so a truncated file
    shows without reading the weights); truncated or not safetensors: an error naming the file."""
    try:
        if header_only:
            with safe_open(str(f), "pt"):
                return {}
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f}: unreadable safetensors file ({e})") from None


def load_state_dict(path: Path) -> dict:
    """Every tensor of an HF-format directory's safetensors file(s)."""
    return {k: v for f in weight_files(path) for k, v in read_safetensors(f).items()}
