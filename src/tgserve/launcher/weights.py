"""Turns --model-id into a folder to load: the packaged default, a GGUF, a folder or a hub id."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

from tgserve import env
from tgserve.isolated import in_child_process
from tgserve.launcher.default_model import DEFAULT_MODEL_ID, default_model_path
from tgserve.launcher.source import ModelResolutionError, ModelSource

log = logging.getLogger(__name__)

CONFIG_AND_TOKENIZER_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model*.bin.index.json"]
PICKLE_GLOB = "pytorch_model*.bin"


def resolve_model(
    model_id: str | None,
    revision: str | None,
    hub_cache: Path | None,
    cache_dir: Path,
    allow_pickle_conversion: bool = False,
) -> ModelSource:
    """Offline first: a local path never touches the hub; a cached hub model needs no network."""
    start = time.perf_counter()
    if model_id is None:
        source = _from_gguf(DEFAULT_MODEL_ID, default_model_path(cache_dir), cache_dir)
    elif model_id.endswith(".gguf"):
        source = _from_gguf(model_id, _existing_gguf(model_id), cache_dir)
    elif Path(model_id).expanduser().is_dir():
        folder = Path(model_id).expanduser().resolve()
        _check_folder(folder, model_id, allow_pickle_conversion)
        source = ModelSource(model_id, folder, None, None)
    elif _looks_like_path(model_id):
        raise ModelResolutionError(f"--model-id {model_id!r}: no such folder")
    else:
        source = _from_hub(model_id, revision, hub_cache, allow_pickle_conversion)
    log.info(
        "model %s resolved to %s in %.1fs",
        source.model_id,
        source.gguf_file or source.path,
        time.perf_counter() - start,
    )
    return source


# ---------------------------------------------------------------- local folders and pickle weights


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1


def _check_folder(folder: Path, model_id: str, allow_pickle_conversion: bool) -> None:
    if not (folder / "config.json").is_file():
        raise ModelResolutionError(f"{model_id}: {folder} has no config.json")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(folder.glob(PICKLE_GLOB))
    if not pickles:
        raise ModelResolutionError(
            f"{model_id}: {folder} has no *.safetensors weights. If the model only ships pickle "
            "(pytorch_model*.bin) weights, pass --convert-pickle-weights to fetch and convert them."
        )
    if not allow_pickle_conversion:
        names = ", ".join(p.name for p in pickles[:3])
        raise ModelResolutionError(
            f"{model_id}: {folder} only has pickle weights ({names}); loading pickle can run "
            "arbitrary code, so they are refused. Pass --convert-pickle-weights to convert them "
            "once to safetensors next to them, or use a revision with safetensors weights "
            "(e.g. the hub's safetensors conversion PR: --revision refs/pr/N)."
        )
    log.warning("converting pickle weights in %s to safetensors (--convert-pickle-weights)", folder)
    # The conversion needs torch, which would stay in the launcher's memory for as long
    # as the server runs: it runs in a child process.
    in_child_process(_convert_pickles, folder)


def _convert_pickles(folder: Path) -> None:
    from tgserve.launcher.pickle_conversion import convert_bin_to_safetensors

    convert_bin_to_safetensors(folder)


# ---------------------------------------------------------------- the Hugging Face hub


def _from_hub(
    model_id: str, revision: str | None, hub_cache: Path | None, allow_pickle_conversion: bool
) -> ModelSource:
    patterns = CONFIG_AND_TOKENIZER_FILES + SAFETENSORS_PATTERNS
    folder = _snapshot(model_id, revision, hub_cache, patterns)
    if not _has_weights(folder) and allow_pickle_conversion:
        # Pickle files are fetched only when the user agreed to convert them.
        folder = _snapshot(model_id, revision, hub_cache, patterns + PICKLE_PATTERNS)
    _check_folder(folder, model_id, allow_pickle_conversion)
    return ModelSource(model_id, folder, None, folder.name)


def _has_weights(folder: Path) -> bool:
    weights = any(folder.glob("*.safetensors")) or any(folder.glob(PICKLE_GLOB))
    return (folder / "config.json").is_file() and weights


def _snapshot(
    repo_id: str,
    revision: str | None,
    hub_cache: Path | None,
    patterns: list[str],
) -> Path:
    """The cached snapshot when it is complete (no network), else a real download."""

    def fetch(local_files_only: bool) -> Path:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=hub_cache,
            allow_patterns=patterns,
            local_files_only=local_files_only,
        )
        return Path(folder)

    offline = env.hub_offline()
    try:
        cached = fetch(local_files_only=True)
        if _has_weights(cached) or offline:
            return cached
        reason: Exception | str = f"the cached snapshot {cached} misses files"
    except HFValidationError as e:
        raise ModelResolutionError(
            f"--model-id {repo_id!r} is neither a local folder, a .gguf file, nor a hub id: {e}"
        ) from e
    except (OSError, EntryNotFoundError) as e:
        reason = e
    if offline:
        why = f"HF_HUB_OFFLINE is set; {reason}"
        raise ModelResolutionError(_not_found(repo_id, revision, hub_cache, why))
    log.info(
        "downloading %s (revision %s) into %s",
        repo_id,
        revision or "main",
        _hub_cache_dir(hub_cache),
    )
    try:
        return fetch(local_files_only=False)
    except Exception as e:  # every failure here means the same to the user: not cached, not fetched
        why = f"{reason}; {e}"
        raise ModelResolutionError(_not_found(repo_id, revision, hub_cache, why)) from e


def _hub_cache_dir(hub_cache: Path | None) -> Path:
    return hub_cache if hub_cache is not None else Path(hub_constants.HF_HUB_CACHE)


def _not_found(repo_id: str, revision: str | None, hub_cache: Path | None, why: str) -> str:
    return (
        f"model {repo_id!r} (revision {revision or 'main'}) is not in the Hugging Face cache at "
        f"{_hub_cache_dir(hub_cache)} and could not be downloaded ({why}). It is not a local "
        "folder either. Check the id, --revision, --huggingface-hub-cache and the network."
    )


# ---------------------------------------------------------------- GGUF files


def _existing_gguf(model_id: str) -> Path:
    path = Path(model_id).expanduser()
    if not path.is_file():
        raise ModelResolutionError(
            f"--model-id {model_id!r}: no such GGUF file (only local ones are read)"
        )
    return path.resolve()


def _from_gguf(model_id: str, gguf_file: Path, cache_dir: Path) -> ModelSource:
    return ModelSource(model_id, gguf_sidecar(gguf_file, cache_dir), gguf_file, None)


def gguf_sidecar(gguf_file: Path, cache_dir: Path) -> Path:
    """A folder with config, tokenizer and generation config for `gguf_file`, built once and reused.

    Parsing a GGUF's metadata and tokenizer is slow; a saved tokenizer loads far faster.
    """
    stat = gguf_file.stat()
    folder = cache_dir / "gguf" / f"{gguf_file.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        start = time.perf_counter()
        _build_gguf_sidecar(gguf_file, tmp)
        try:
            os.rename(tmp, folder)  # atomic: a racing process sees no folder or a whole one
        except OSError:
            if not (folder / "config.json").is_file():
                raise
            log.info("another process built %s first; using it", folder)
        else:
            took = time.perf_counter() - start
            log.info("wrote %s for %s in %.1fs", folder, gguf_file.name, took)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _build_gguf_sidecar(gguf_file: Path, out: Path) -> None:
    # transformers and torch, which this needs, would stay in the launcher's memory
    # for as long as the server runs.
    in_child_process(write_gguf_sidecar, gguf_file, out)


def write_gguf_sidecar(gguf_file: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    parsed = load_gguf_checkpoint(str(gguf_file), return_tensors=False)
    config_dict = {k: v for k, v in parsed["config"].items() if k != "_model_name_or_path"}
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    if not config.architectures and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    template = parsed.get("tokenizer_config", {}).get("chat_template")
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    if getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = config.max_position_embeddings
    eos_ids = _eos_token_ids(gguf_file, config.eos_token_id, tokenizer.eos_token_id)
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_ids, pad_token_id=config.pad_token_id
    )
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    generation.save_pretrained(out)


EOS_METADATA_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)


def _eos_token_ids(gguf_file: Path, *known: int | list[int] | None) -> list[int]:
    """Every id that ends generation: the config's and tokenizer's EOS, and llama.cpp's EOT/EOM."""
    metadata = _gguf_metadata(gguf_file, EOS_METADATA_KEYS)
    found: list[int] = []
    for value in (*known, *(metadata.get(k) for k in EOS_METADATA_KEYS)):
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and token_id not in found:
                found.append(token_id)
    return found


def _gguf_metadata(gguf_file: Path, keys: tuple[str, ...]) -> dict[str, object]:
    try:  # transformers 5's reader skips the big arrays; gguf's parses them all (seconds)
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:
        from gguf import GGUFReader

        reader = GGUFReader(gguf_file)
        return {k: field.contents() for k in keys if (field := reader.get_field(k)) is not None}
    return {k: v for k, v in read_gguf_metadata(str(gguf_file))[0].items() if k in keys}
