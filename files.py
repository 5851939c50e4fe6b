"""Files that never end half-written: atomic writes (temp file, then rename) and JSONL.

Every artefact of a run (checkpoints, STaR samples, reports) goes through `atomic_write`, so a
killed process leaves either the old file or the new one, never a torn one.
"""
import json
import os
import tempfile
from pathlib import Path


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
