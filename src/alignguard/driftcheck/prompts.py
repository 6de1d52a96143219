"""DriftCheck prompt records: loading user files (JSONL, CSV, `datasets` on disk) and the bundled sets.

A prompt record is `{id, prompt, label: safe|unsafe, category, source}`. Defaults for missing columns:

* `id`: `"p-" + sha256(prompt)[:12]`, stable across runs and row order;
* `category`: `"uncategorized"` for both labels (we do not guess a harm category from text);
* `source`: the file name.

The bundled sets live in `alignguard/resources/` (see `resources/driftcheck/README.md` for their sources,
licenses and hashes); `scripts/build_driftcheck_data.py` rebuilds them deterministically. Splits by name
(`bundled_prompts(name)`, and `resolve_prompts(name)` for a `prompts:` setting): `full` (every prompt), `small`,
`standard` (compare runs), `demo` (a subset of standard) and `calibration` (disjoint from standard); the last three
are drawn from `full` by `scripts/build_driftcheck_splits.py`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

LABELS = ("safe", "unsafe")
UNSAFE_CATEGORIES = (
    "violence",
    "hate",
    "illegal_activity",
    "sexual",
    "privacy",
    "misinformation",
    "self_harm",
    "cyber",
)
LOOKALIKE_CATEGORY = "benign_lookalike"
DEFAULT_CATEGORY = "uncategorized"
DRIFTCHECK_VERSION = "driftcheck-v1"
ALIGNMENT_VERSION = "alignment-v1"

_RESOURCES = Path(__file__).resolve().parent.parent / "resources"
_SPLIT_FILES = {
    "full": "driftcheck_v1.jsonl",
    "small": "driftcheck_small.jsonl",
    "standard": "driftcheck_standard.jsonl",
    "demo": "driftcheck_demo.jsonl",
    "calibration": "driftcheck_calibration.jsonl",
}
BUNDLED_SPLITS = tuple(_SPLIT_FILES)
SplitName = Literal["full", "small", "standard", "demo", "calibration"]


class PromptFileError(ValueError):
    """A prompt file cannot be used; the message names the file, the line/row and what to fix."""


@dataclass
class PromptRecord:
    """One DriftCheck prompt.

    Args:
        id (`str`): Unique within a set.
        prompt (`str`): The user message sent to the model.
        label (`Literal["safe", "unsafe"]`): Whether a well-aligned model should refuse (`"unsafe"`) or answer.
        category (`str`): One of `UNSAFE_CATEGORIES` for unsafe prompts; `benign_*` topics for safe ones.
        source (`str`): Where the prompt comes from (dataset name or file name).
    """

    id: str
    prompt: str
    label: Literal["safe", "unsafe"]
    category: str
    source: str


def stable_id(prompt: str) -> str:
    """An id derived from the prompt text only, so it survives reordering and re-exports."""
    return "p-" + hashlib.sha256(prompt.strip().encode("utf-8")).hexdigest()[:12]


def _read_utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 raises `PromptFileError` naming the file, line and fix."""
    data = path.read_bytes()
    try:
        # utf-8-sig: a byte-order mark (Excel and Notepad write one) must not end up in the first column name.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        lineno = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise PromptFileError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8` or 'Save as UTF-8' in your editor)"
        ) from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    # Split on newlines only (as text-mode reading did): U+2028 may sit unescaped inside a JSON string.
    for lineno, line in enumerate(_read_utf8(path).replace("\r\n", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(
                f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno}); each line must be one JSON "
                'object such as {"prompt": "...", "label": "unsafe"}'
            ) from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(_read_utf8(path), newline=""))
    if not reader.fieldnames:
        raise PromptFileError(f"{path}: no header row; the first CSV row must name the columns (e.g. prompt,label)")
    # Report the physical line where each row starts (rows may span lines in quoted fields).
    rows = []
    start = reader.line_num + 1
    for row in reader:
        # Cells beyond the header land under the key None; they carry no named field, so drop them.
        rows.append((start, {k: v for k, v in row.items() if k is not None}))
        start = reader.line_num + 1
    return rows


def _read_dataset(path: Path) -> list[tuple[int, dict]]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as err:  # pragma: no cover - datasets is a core dependency
        raise PromptFileError(f"{path}: reading a saved dataset needs the `datasets` package") from err
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if len(ds) != 1:
            raise PromptFileError(f"{path}: a DatasetDict with splits {list(ds)}; pass the folder of one split")
        ds = next(iter(ds.values()))
    return [(i + 1, dict(row)) for i, row in enumerate(ds)]


def read_rows(path: str | Path) -> tuple[list[tuple[int, dict]], str]:
    """The raw rows of a JSONL/CSV file or a saved dataset as `(line or row number, dict)`, and that unit's name.

    Raises:
        PromptFileError: missing file, unsupported extension, a file that is not UTF-8, or a malformed line.
    """
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: file not found")
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            raise PromptFileError(f"{path}: a folder but not a dataset saved with `datasets.Dataset.save_to_disk`")
        return _read_dataset(path), "row"
    if path.suffix.lower() in (".jsonl", ".json"):
        return _read_jsonl(path), "line"
    if path.suffix.lower() == ".csv":
        return _read_csv(path), "line"
    raise PromptFileError(f"{path}: unsupported extension {path.suffix!r}; use .jsonl, .csv or a saved dataset")


def load_prompts(
    path: str | Path, prompt_field: str = "prompt", label: str | None = None, id_field: str = "id"
) -> list[PromptRecord]:
    """Load prompt records from a JSONL or CSV file, or a `datasets` dataset saved with `save_to_disk`.

    Args:
        path (`str` or `Path`): `.jsonl`/`.json` (one object per line), `.csv` (header row), or a folder.
        prompt_field (`str`, defaults to `"prompt"`): Column holding the prompt text.
        label (`str`, *optional*): `"safe"` or `"unsafe"` for every row (for files without a label column);
            overrides any label column.
        id_field (`str`, defaults to `"id"`): Column holding the id; missing ids get `stable_id(prompt)`.

    Returns:
        `list[PromptRecord]`: In file order.

    Raises:
        PromptFileError: For a missing file, an unsupported extension, a malformed line, a missing field, an unknown
            label, an empty prompt, duplicate ids or zero rows; the message names the file and line/row.
    """
    path = Path(path)
    if label is not None and label not in LABELS:
        raise PromptFileError(f"label={label!r} is not allowed; use one of {', '.join(LABELS)}")
    rows, unit = read_rows(path)
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    for lineno, row in rows:
        where = f"{path}:{lineno}" if unit == "line" else f"{path} row {lineno}"
        if prompt_field not in row or row[prompt_field] is None:
            raise PromptFileError(
                f"{where}: missing field {prompt_field!r}; fields present: {sorted(row)}. "
                "Rename the column or pass prompt_field=..."
            )
        text = str(row[prompt_field])
        if not text.strip():
            raise PromptFileError(f"{where}: empty {prompt_field!r}; remove the row or fill in the prompt")
        row_label = label if label is not None else row.get("label")
        if row_label is None or row_label == "":
            raise PromptFileError(
                f"{where}: missing field 'label'; fields present: {sorted(row)}. "
                "Add a label column (safe/unsafe) or pass label='safe'/'unsafe' for the whole file"
            )
        row_label = str(row_label).strip().lower()
        if row_label not in LABELS:
            raise PromptFileError(f"{where}: unknown label {row_label!r}; allowed values: {', '.join(LABELS)}")
        rid = row.get(id_field)
        rid = str(rid) if rid not in (None, "") else stable_id(text)
        if rid in seen:
            raise PromptFileError(
                f"{where}: duplicate id {rid!r} (first seen at {unit} {seen[rid]}); ids must be unique. "
                "Drop the repeated prompt or give it another id"
            )
        seen[rid] = lineno
        category = row.get("category") or DEFAULT_CATEGORY
        source = row.get("source") or path.name
        records.append(PromptRecord(rid, text, row_label, str(category), str(source)))  # type: ignore[arg-type]
    if not records:
        raise PromptFileError(f"{path}: no prompts found (zero rows); the file must hold at least one prompt")
    return records


def save_prompts(records: list, path: str | Path) -> Path:
    """Write records as JSONL (UTF-8, one object per line, keys in field order) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(asdict(rec), ensure_ascii=False) + "\n")
    return path


def prompts_hash(records: list[PromptRecord]) -> str:
    """sha256 over a canonical JSON of the records (order-sensitive): identifies the exact prompt set."""
    payload = json.dumps(
        [[r.id, r.prompt, r.label, r.category, r.source] for r in records], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def bundled_prompts_path(split: SplitName = "full") -> Path:
    """Path of a bundled DriftCheck split.

    `"full"`: driftcheck_v1.jsonl (every prompt); `"small"`: a quick ~120-prompt subset; `"standard"`: the
    evaluation split of compare runs (320 unsafe + 320 safe); `"demo"`: its 240-prompt stratified subset;
    `"calibration"`: 240 prompts disjoint from `"standard"` (ids and near-duplicates), for choosing lambda.
    See `resources/driftcheck/README.md`.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"unknown DriftCheck split {split!r}; use one of {', '.join(_SPLIT_FILES)}")
    return _RESOURCES / "driftcheck" / _SPLIT_FILES[split]


def bundled_prompts(split: SplitName = "full") -> list[PromptRecord]:
    """The bundled DriftCheck prompts of one split (see `bundled_prompts_path`)."""
    return load_prompts(bundled_prompts_path(split))


def resolve_prompts(prompts: str | Path | None) -> Path | None:
    """A `prompts` setting as a file: a bundled split name (`"standard"`, ...) -> its path; a path -> itself;
    `None` -> `None` (the caller's default).

    Raises:
        PromptFileError: `prompts` is neither an existing file/folder nor a bundled split name; the message
            lists the names.
    """
    if prompts is None:
        return None
    if str(prompts) in _SPLIT_FILES:
        return bundled_prompts_path(str(prompts))  # type: ignore[arg-type]
    path = Path(prompts)
    if not path.exists():
        raise PromptFileError(
            f"prompts: {str(prompts)!r} is neither a prompt file nor a bundled split; give a JSONL/CSV path or "
            f"one of {', '.join(_SPLIT_FILES)}"
        )
    return path


# --------------------------------------------------------------------------- rendering
# One renderer for training (alignguard.data: Fisher, alignment, fine-tuning) and evaluation (DriftCheck
# generation), so a model is evaluated on exactly the text format it was trained on.

FALLBACK_PROMPT_FORMAT = "User: {prompt}\nAssistant: "


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: str, system: str | None = None, use_chat_template: bool = True) -> str:
    """The prompt as the model sees it before its answer.

    With a chat template (and `use_chat_template`): one optional system turn, one user turn and the generation
    prompt. Otherwise the plain format `"{system}\nUser: {prompt}\nAssistant: "` (system line only when given).

    Raises:
        ValueError: the chat template fails on these messages (e.g. a template without a system role); the
            message names the tokenizer and the fix.
    """
    if not (use_chat_template and has_chat_template(tokenizer)):
        return (f"{system}\n" if system else "") + FALLBACK_PROMPT_FORMAT.format(prompt=prompt)
    from jinja2 import TemplateError

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        # tokenize=False: in transformers 5, tokenize=True returns a BatchEncoding, not a list of ids.
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        fix = (
            "this template may not accept a system turn: drop the system prompt (--system-prompt / system=None)"
            if system
            else "fix the tokenizer's chat_template (tokenizer_config.json / chat_template.jinja)"
        )
        raise ValueError(
            f"the chat template of tokenizer {name!r} failed to render the prompt ({type(exc).__name__}: {exc}); "
            f"{fix}, or render without the template (GenerationSettings.use_chat_template=False)"
        ) from exc


def prompt_token_ids(tokenizer, prompt: str, system: str | None = None, use_chat_template: bool = True) -> list[int]:
    """Token ids of `render_prompt(...)`, the same for training and generation.

    A chat template already writes bos and role markers, so no special tokens are added then (they would double
    bos); the plain format gets the tokenizer's own special tokens (e.g. bos), as a base model expects.
    """
    templated = use_chat_template and has_chat_template(tokenizer)
    text = render_prompt(tokenizer, prompt, system, use_chat_template)
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
