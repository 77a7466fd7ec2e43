"""Tiny random models and tokenizers built on the spot (no network): the ground truth for exactness tests."""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "LoRA adapters change a few weights of a large language model.",
    "Serving thousands of adapters from one server is cheap and fast.",
    "Hello world! Numbers like 12345 and symbols like #@$ also appear.",
] * 20

ARCHS = ("llama", "mistral", "qwen2")


def make_tokenizer(folder: Path):
    """A byte-level BPE tokenizer with <s>/</s>/<unk> specials, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def make_model(arch: str, folder: Path, seed: int = 0, **overrides):
    """Save a tiny random `arch` model (plus tokenizer) into `folder` and return the transformers model."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(folder)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    common.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    model = model_cls(config_cls(**common)).eval()
    with torch.no_grad():  # larger weights make greedy choices decisive, so float noise cannot flip a token
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(folder)
    return model


def make_adapter(model, folder: Path, seed: int, r: int, alpha: float, targets: list[str], **extra) -> Path:
    """A random PEFT LoRA adapter for `model` (B non-zero so it changes the output), saved in `folder`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(folder)
    peft_model.unload()  # restore the base model object for the next adapter
    return folder
