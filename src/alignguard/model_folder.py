"""One local Hugging Face model folder: check it, then load its model and tokenizer, with one clear error per case.

Every failure a user can cause names the path and the fix: a missing folder, a LoRA adapter given as a model,
no tokenizer files, a config.json that is not JSON or names a `model_type` transformers does not know, a cut
safetensors file (checked from its header before loading), a damaged or pickle-carrying pytorch_model.bin.
Nothing runs code shipped with a model (`trust_remote_code=False`: a config's `auto_map` is ignored) and
nothing contacts a hub (`local_files_only=True`). `alignguard.models` resolves specs (names, GGUF) to folders.
"""

from __future__ import annotations

import json
import os
import pickle  # only for its exception type: nothing is unpickled here
from pathlib import Path

import torch

_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # plus any *.safetensors (sharded or not)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved or loaded; the message names the path and says what to do."""


def check_model_folder(path: str | os.PathLike, need_tokenizer: bool = False) -> Path:
    """Raise `ModelLoadError` naming `path` and what is missing unless it is an HF causal-LM folder."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model path {p} does not exist (alignguard runs offline: give a local model folder)")
    if not p.is_dir():
        raise ModelLoadError(f"model path {p} is a file, not a model folder with config.json and weights")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any((p / f).is_file() for f in _WEIGHT_FILES) and not any(p.glob("*.safetensors")):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if missing:
        hint = ""
        if (p / "adapter_config.json").is_file():
            hint = " It holds adapter_config.json: it is a LoRA adapter (PEFT); pass it as --adapter with its base --model."
        raise ModelLoadError(f"{p} is not a Hugging Face model folder: missing {' and '.join(missing)}.{hint}")
    if need_tokenizer and not has_tokenizer_files(p):
        raise ModelLoadError(
            f"{p} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); copy them from the model it was "
            f"made from: AutoTokenizer.from_pretrained(BASE).save_pretrained({str(p)!r}) "
            "(in Python, load_model_and_tokenizer(..., tokenizer=PATH) also works)"
        )
    return p


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES)


def resolve_dtype(dtype: str | torch.dtype, device: str | None = None) -> torch.dtype | str:
    """A torch dtype from `"auto" | "float32" | "bfloat16" | "float16"` (or a dtype); `"auto"` is float32 on CPU
    (bf16/fp16 matmuls are slow there) and the checkpoint's dtype (`"auto"` for `from_pretrained`) elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if device in (None, "cpu") else "auto"
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype: must be auto, {', '.join(DTYPES)}, got {dtype!r}")


def _check_config(folder: Path) -> None:
    """Raise `ModelLoadError` for a config.json transformers cannot build a model from without remote code."""
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc}); restore config.json from the original model") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    # auto_map points at Python files shipped with the model; we never run them (trust_remote_code stays off),
    # so only the architectures transformers itself knows can load.
    remote = " (its auto_map names custom code, which alignguard never runs: trust_remote_code is off)"
    remote = remote if isinstance(config, dict) and config.get("auto_map") else ""
    if not model_type:
        raise ModelLoadError(
            f"{path}: no model_type{remote}; set model_type to the architecture (e.g. llama, qwen2, gpt2)"
        )
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(
            f"{path}: model_type {model_type!r} is not an architecture transformers {transformers_version} knows"
            f"{remote}; fix model_type (e.g. llama, qwen2, gpt2) or use a transformers version that has it"
        )


def _check_safetensors(folder: Path) -> None:
    """Raise `ModelLoadError` naming a *.safetensors file that is cut short (a copy or download stopped mid-way).

    The format is an 8-byte header length, a JSON header with each tensor's byte range, then the data; the file
    must hold the header and reach the end of the last tensor. Only the header is read.
    """
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        problem = None
        with open(file, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            if n is None or 8 + n > size:
                problem = f"{size} bytes, too short for its header"
            else:
                try:
                    header = json.loads(fh.read(n))
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError, IndexError):
                    problem = "its header is not valid safetensors JSON"
                else:
                    if 8 + n + end > size:
                        problem = f"{size} bytes, its header promises {8 + n + end}"
        if problem:
            raise ModelLoadError(
                f"{file}: truncated or damaged weights file ({problem}); copy or download the model again"
            )


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir() or not has_tokenizer_files(p):
        what = "does not exist" if not p.exists() else "has no tokenizer files"
        raise ModelLoadError(
            f"tokenizer path {p} {what} (expected a folder with one of {', '.join(_TOKENIZER_FILES)}); "
            "give the folder of the model the tokenizer belongs to"
        )
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{p}: could not load a tokenizer (tokenizer.json / tokenizer_config.json): {exc}; "
            "re-save it with AutoTokenizer.from_pretrained(BASE).save_pretrained(...)"
        ) from exc


def load_folder(folder: Path, dtype: torch.dtype | str, need_tokenizer: bool = True):
    """(model, tokenizer or None) from an HF folder, with one clear `ModelLoadError` per known failure."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_model_folder(folder, need_tokenizer=need_tokenizer)
    _check_config(folder)
    tok = load_tokenizer(folder) if need_tokenizer else None
    _check_safetensors(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True, trust_remote_code=False
        )
    except pickle.UnpicklingError:
        # torch refuses (weights_only) a pickle holding more than tensors; its own hint (turning that check off)
        # would run whatever code the file carries, so it is not repeated here.
        raise ModelLoadError(
            f"{folder}: pytorch_model.bin holds pickled objects other than tensors, which alignguard never loads; "
            "convert the model to safetensors (save_pretrained) on a machine where you trust its source"
        ) from None
    except SafetensorError as exc:
        raise ModelLoadError(
            f"{folder}: damaged safetensors weights ({exc}); copy or download the model again"
        ) from exc
    except RuntimeError as exc:
        if "PytorchStreamReader" not in str(exc):  # only a damaged pytorch_model.bin zip is ours to explain
            raise
        raise ModelLoadError(
            f"{folder}: pytorch_model.bin is truncated or damaged ({str(exc).split('.')[0]}); copy or download the "
            "model again"
        ) from exc
    return model, tok
