"""Read raw records from local files, Hugging Face datasets, or mixtune's built-in domains.

Hostile input is a :class:`DataError` naming the file (and line): JSON nested deeper than the
parser's recursion limit, or an integer too long to convert, as much as malformed JSON.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
from pathlib import Path

from mixtune.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz")


def read_records(
    path: str, split: str = "train", subset: str | None = None, where: str = "dataset"
) -> list[dict]:
    """Records (dicts) from ``path``.

    ``path`` is a local ``.jsonl``/``.jsonl.gz``/``.json``/``.parquet``/``.csv`` file, a glob of
    such files (``data/*.jsonl``: read in sorted order, one after the other), a directory written
    by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``split`` picks the latter's
    split), another directory of data files (read by ``datasets.load_dataset``), a
    ``builtin:<domain>`` name, or a Hugging Face dataset name (``split`` and ``subset`` apply to
    the last three). Errors name the file, the line where relevant, and the fix.
    """
    if "\0" in path:
        raise DataError(f"{where}: path {path!r} contains a NUL character")
    if path.startswith("builtin:"):
        return _read_builtin(path.removeprefix("builtin:"), split, where)
    p = Path(path).expanduser()
    if any(c in path for c in "*?[") and not p.exists():
        shards = sorted(glob.glob(str(p)))
        if not shards:
            raise DataError(f"{where}: no file matches '{path}'")
        return [r for shard in shards for r in read_records(shard, split, subset, where)]
    if p.is_dir():
        if not any(p.iterdir()):
            raise DataError(
                f"{where}: {p} is an empty directory; give a data file or a saved dataset directory"
            )
        if is_saved(p):
            return load_saved(p, split, where).to_list()
        return _read_hub(str(p), split, subset, where)  # data files: read like a hub dataset
    if p.suffix in (".jsonl", ".json", ".parquet", ".csv", ".gz") or p.exists():
        if not p.is_file():
            raise DataError(f"{where}: file not found: {p}")
        name = p.name.lower()
        try:
            if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
                return _read_jsonl(p, where)
            if name.endswith(".json"):
                return _read_json(p, where)
            if name.endswith(".parquet"):
                return _read_parquet(p, where)
            if name.endswith(".csv"):
                return _read_csv(p, where)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{where}: {p}: not UTF-8 text ({e.reason}); re-save the file as UTF-8"
            ) from None
        except (OSError, EOFError, csv.Error) as e:  # unreadable, or a .gz that is not gzip
            raise DataError(f"{where}: {p}: cannot read: {e}") from None
        raise DataError(f"{where}: unsupported file type '{p.name}'; use one of {LOCAL_SUFFIXES}")
    return _read_hub(path, split, subset, where)


def _read_jsonl(p: Path, where: str) -> list[dict]:
    opener = gzip.open if p.name.endswith(".gz") else open
    records = []
    with opener(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:  # decoded line by line, so an error can name the line; a BOM is tolerated
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: {p}:{lineno}: not UTF-8 text ({e.reason} at byte "
                    f"{e.start}); re-save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: {p}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                    "each line must be one JSON object"
                ) from None
            except (RecursionError, ValueError) as e:
                raise DataError(f"{where}: {p}:{lineno}: {hostile(e)}") from None
            if not isinstance(rec, dict):
                raise DataError(
                    f"{where}: {p}:{lineno}: expected a JSON object, got {type(rec).__name__}"
                )
            records.append(rec)
    return records


def _read_json(p: Path, where: str) -> list[dict]:
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: {p}: malformed JSON at line {e.lineno}: {e.msg}") from None
    except (RecursionError, ValueError) as e:
        raise DataError(f"{where}: {p}: {hostile(e)}") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} shapes
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{where}: {p}: expected a list of records (or one list in an object)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{where}: {p}: expected a JSON list of objects")
    return data


def hostile(e: Exception) -> str:
    """What is wrong with JSON that parses into a RecursionError or a ValueError."""
    if isinstance(e, RecursionError):
        return (
            "JSON nested too deeply to read (arrays or objects inside each other); fix the record"
        )
    return f"unreadable JSON ({str(e).split(':')[0]}); fix the record"


def is_saved(p: Path) -> bool:
    """Whether ``p`` is a directory written by ``Dataset``/``DatasetDict.save_to_disk``."""
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def load_saved(p: Path, split: str, where: str):
    """The ``datasets.Dataset`` saved in ``p``: the one ``Dataset`` (whole: ``split`` does not
    apply), or the ``split`` of a ``DatasetDict``."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DataError(
            f"{where}: {p}: cannot read the saved dataset ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{where}: {p} has splits {sorted(ds)}, not '{split}'; set split: to one of them"
            )
        ds = ds[split]
    return ds


def _read_parquet(p: Path, where: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for bad files
        raise DataError(f"{where}: {p}: cannot read Parquet: {e}") from None


def _read_csv(p: Path, where: str) -> list[dict]:
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DataError(f"{where}: {p}: empty CSV (no header row)")
        return [dict(r) for r in reader]


def _read_hub(name: str, split: str, subset: str | None, where: str) -> list[dict]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError(
            f"{where}: '{name}' is not a local file and `datasets` is missing"
        ) from None
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        raise DataError(
            f"{where}: '{name}' is neither a local file nor a loadable Hugging Face dataset "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None
    return [dict(r) for r in ds]


def _read_builtin(domain: str, split: str, where: str) -> list[dict]:
    try:
        from mixtune.builtin import DOMAINS, load_domain
        from mixtune.builtin.domains import SPLITS
    except ImportError:
        raise DataError(f"{where}: built-in domains are not available in this install") from None
    if domain not in DOMAINS:
        raise DataError(f"{where}: unknown built-in domain '{domain}'; known: {sorted(DOMAINS)}")
    if split not in SPLITS:
        raise DataError(
            f"{where}: built-in domains have splits {list(SPLITS)} (dev and test: "
            f"the two halves of eval), not '{split}'"
        )
    return load_domain(domain, split=split)
