"""Model resolution, config creation and the built-in default model."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch

from aserve.config import EngineArgs
from aserve.models import create_model_config, load_model, load_tokenizer, resolve_model_path
from aserve.models.default_model import DEFAULT_MODEL_NAME, _build_default_model, default_model_path
from tiny_models import MAX_POSITIONS, tiny_model_dir


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.fixture
def default_model_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ASERVE_CACHE_DIR", str(tmp_path / "aserve-cache"))
    return tmp_path / "aserve-cache"


def _args(model, **kwargs) -> EngineArgs:
    return EngineArgs(model=model, device="cpu", **kwargs)


def test_local_folder_is_used_as_is():
    path = tiny_model_dir("llama")
    assert resolve_model_path(path) == path


def test_uncached_hub_id_offline_explains_how_to_pass_a_folder(offline_hub):
    with pytest.raises(OSError, match="neither a local folder nor in the Hugging Face cache") as err:
        resolve_model_path("aserve-tests/no-such-model")
    assert "local folder" in str(err.value) and "aserve-tests/no-such-model" in str(err.value)
    with pytest.raises(OSError, match="could not be reached"):
        create_model_config(_args("aserve-tests/no-such-model"))


def test_missing_local_path_is_an_error():
    with pytest.raises(OSError, match="not a folder"):
        resolve_model_path("./no/such/folder")


def test_auto_dtype_is_float32_on_cpu():
    config = create_model_config(_args(tiny_model_dir("qwen2")))
    assert config.dtype == torch.float32
    assert {p.dtype for p in load_model(config, "cpu").parameters()} == {torch.float32}


def test_explicit_bfloat16_is_honoured():
    config = create_model_config(_args(tiny_model_dir("opt"), dtype="bfloat16"))
    assert config.dtype == torch.bfloat16
    assert {p.dtype for p in load_model(config, "cpu").parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the loader restores it


def test_max_model_len_defaults_to_the_models_limit():
    assert create_model_config(_args(tiny_model_dir("llama"))).max_model_len == MAX_POSITIONS
    assert create_model_config(_args(tiny_model_dir("gpt2"))).max_model_len == MAX_POSITIONS  # n_positions
    assert create_model_config(_args(tiny_model_dir("opt"), max_model_len=100)).max_model_len == 100


def test_max_model_len_over_the_models_limit_is_rejected():
    with pytest.raises(ValueError, match="max_model_len 513 is longer than the model supports"):
        create_model_config(_args(tiny_model_dir("llama"), max_model_len=MAX_POSITIONS + 1))


def test_config_fields():
    path = tiny_model_dir("gpt2")
    config = create_model_config(_args(path, seed=7))
    assert (config.model, config.model_path, config.tokenizer_path) == (path, path, path)
    assert (config.architecture, config.served_model_name, config.seed) == ("GPT2LMHeadModel", path, 7)
    named = create_model_config(_args(path, served_model_name="my-model"))
    assert named.served_model_name == "my-model"


def test_separate_tokenizer_folder():
    config = create_model_config(_args(tiny_model_dir("llama"), tokenizer=tiny_model_dir("gpt2")))
    assert config.tokenizer_path == tiny_model_dir("gpt2")


def test_load_tokenizer_has_special_tokens_and_chat_template():
    tokenizer = load_tokenizer(create_model_config(_args(tiny_model_dir("llama"))))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_default_model_builds_small_and_loads(default_model_cache):
    path = default_model_path()
    assert path.startswith(str(default_model_cache))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size < 5 * 2**20
    config = create_model_config(EngineArgs(device="cpu"))
    assert (config.served_model_name, config.architecture) == (DEFAULT_MODEL_NAME, "LlamaForCausalLM")
    assert config.model_path == path and config.max_model_len == 2048
    tokenizer = load_tokenizer(config)
    ids = tokenizer("Any text at all, even ünïcode 🙂 and <html>")["input_ids"]
    assert max(ids) < config.vocab_size
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Any text at all, even ünïcode 🙂 and <html>"


def test_default_model_is_built_once(default_model_cache):
    path = default_model_path()
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    time.sleep(0.01)
    assert default_model_path() == path
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    assert [p.name for p in default_model_cache.iterdir()] == ["default-model-v1"]  # no temp left


def test_default_model_is_deterministic(default_model_cache, tmp_path):
    first = load_model(create_model_config(EngineArgs(device="cpu")), "cpu").state_dict()
    second = load_model(create_model_config(EngineArgs(device="cpu")), "cpu").state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # An independent build writes byte-identical files.
    _build_default_model(str(tmp_path / "rebuild"))

    def digest(folder, name):
        return hashlib.sha256((folder / name).read_bytes()).hexdigest()

    built = default_model_cache / "default-model-v1"
    for name in ("model.safetensors", "tokenizer.json"):
        assert digest(built, name) == digest(tmp_path / "rebuild", name)


def test_cached_hub_id_resolves_offline(offline_hub, tmp_path):
    import shutil

    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(huggingface_hub.constants.HF_HUB_CACHE, "models--aserve-tests--cached")
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(tiny_model_dir("llama"), os.path.join(repo, "snapshots", commit))
    config = create_model_config(_args("aserve-tests/cached"))
    assert config.model_path == os.path.join(repo, "snapshots", commit)
    assert config.served_model_name == "aserve-tests/cached"


def test_hf_overrides_set_config_fields_before_anything_reads_them():
    """vLLM's --hf-overrides: here a longer context than config.json allows."""
    path = tiny_model_dir("llama")
    config = create_model_config(_args(path, hf_overrides={"max_position_embeddings": 2 * MAX_POSITIONS}))
    assert config.max_model_len == 2 * MAX_POSITIONS
    assert config.hf_config.max_position_embeddings == 2 * MAX_POSITIONS
    rope = dict(config.hf_config.rope_parameters)
    merged = create_model_config(_args(path, hf_overrides={"rope_parameters": {"rope_theta": 1234.0}}))
    assert merged.hf_config.rope_parameters == {**rope, "rope_theta": 1234.0}   # a dict field is updated


def test_hf_overrides_reach_the_model():
    from aserve import OfflineLLM, SamplingParams

    path, params = tiny_model_dir("llama"), SamplingParams(temperature=0, max_tokens=8)
    plain = OfflineLLM(model=path, device="cpu", dtype="float32", kv_cache_memory_gb=0.05)
    moved = OfflineLLM(model=path, device="cpu", dtype="float32", kv_cache_memory_gb=0.05,
                       hf_overrides={"rope_parameters": {"rope_theta": 3.0}})
    prompt = "The capital of France is"
    assert (plain.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
            != moved.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)
