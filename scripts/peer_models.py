"""The benchmark peers' copies of tgserve's default model; a check that all hold one set of weights.

Usage (with the project's venv; scripts/peers.sh calls it):
  python scripts/peer_models.py source              path of the default Q4_1 GGUF tgserve serves
  python scripts/peer_models.py hf OUT              float32 Hugging Face folder (vLLM reads it)
  python scripts/peer_models.py verify HF GGUF_F32  every tensor equal to what tgserve serves

tgserve dequantizes the Q4_1 GGUF to float32 at load; the folder written here holds those same
float32 tensors (with the sidecar's config and tokenizer), and llama-quantize's F32 GGUF holds them
in llama.cpp's layout. `verify` reads all three back through the loader tgserve uses and compares
them bit for bit.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

from tgserve import env
from tgserve.launcher.default_model import default_model_path
from tgserve.launcher.weights import gguf_sidecar
from tgserve.shard.loading.gguf import load_gguf_tensors


def source_gguf() -> Path:
    return default_model_path(env.cache_dir())


def write_hf_folder(out: Path) -> None:
    """The tensors tgserve serves, as float32 safetensors, beside the sidecar's config and tokenizer
    (transformers refuses to save_pretrained a model it loaded from a GGUF file.)
    """
    gguf = source_gguf()
    sidecar = gguf_sidecar(gguf, env.cache_dir())
    config = AutoConfig.from_pretrained(str(sidecar))
    tensors = load_gguf_tensors(gguf, config, torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    tmp.chmod(0o755)
    try:
        config.torch_dtype = torch.float32
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(sidecar)).save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if (sidecar / extra).is_file():
                shutil.copy(sidecar / extra, tmp / extra)
        tensors = {name: t.contiguous() for name, t in tensors.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}")


def verify(hf_folder: Path, gguf_f32: Path) -> int:
    """0 when the F32 GGUF and the HF folder hold exactly the tensors tgserve serves."""
    gguf = source_gguf()
    config = AutoConfig.from_pretrained(str(gguf_sidecar(gguf, env.cache_dir())))
    served = load_gguf_tensors(gguf, config, torch.float32)
    as_gguf = load_gguf_tensors(gguf_f32, config, torch.float32)
    as_hf = load_file(str(hf_folder / "model.safetensors"))
    failures = _compare("F32 GGUF", served, as_gguf) + _compare("HF folder", served, as_hf)
    hf_config = AutoConfig.from_pretrained(str(hf_folder))
    if hf_config.tie_word_embeddings != config.tie_word_embeddings:
        failures.append("HF folder: tie_word_embeddings differs")
    for line in failures:
        print(f"MISMATCH {line}", file=sys.stderr)
    if not failures:
        print(
            f"OK: {len(served)} tensors ({sum(t.numel() for t in served.values()):,} values) "
            f"identical in {gguf.name} (dequantized), {gguf_f32.name} and {hf_folder.name}"
        )
    return 1 if failures else 0


def _compare(
    label: str, served: dict[str, torch.Tensor], other: dict[str, torch.Tensor]
) -> list[str]:
    failures = []
    for name, tensor in served.items():
        twin = other.get(name)
        if twin is None:
            failures.append(f"{label}: {name} is missing")
        elif twin.dtype != torch.float32 or twin.shape != tensor.shape:
            failures.append(f"{label}: {name} is {twin.dtype} {tuple(twin.shape)}")
        elif not torch.equal(twin, tensor):
            diff = (twin - tensor).abs().max().item()
            failures.append(f"{label}: {name} differs (max abs diff {diff:g})")
    # A tied lm_head may be stored or not; anything else extra is a different model.
    extra = set(other) - set(served) - {"lm_head.weight"}
    failures += [f"{label}: unexpected tensor {name}" for name in sorted(extra)]
    return failures


def main(argv: list[str]) -> int:
    match argv:
        case ["source"]:
            print(source_gguf())
        case ["hf", out]:
            write_hf_folder(Path(out))
        case ["verify", hf_folder, gguf_f32]:
            return verify(Path(hf_folder), Path(gguf_f32))
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
