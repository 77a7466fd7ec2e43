"""Train the demo's two LoRA adapters for SmolLM2-135M-Instruct (once, cached) and print where they are.

`pirate` answers like a pirate and `shout` answers in capitals: styles the base model never uses, so the demo shows
at a glance that each request ran with its own adapter. Each is a rank-8 PEFT adapter on every linear layer, trained
for a minute or two on CPU on a small set of questions in both the raw (`question\\n`) and the chat-template form,
with the loss on the answer only. They live in `<weights cache>/lorax-demo-adapters/<name>`, so requests can name
them as local adapters relative to the cache; a recipe hash beside each says when it must be trained again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the largest ocean?", "The largest ocean is the Pacific Ocean."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius."),
    ("What do bees make?", "Bees make honey."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is the tallest animal?", "The giraffe is the tallest animal."),
    ("Where do penguins live?", "Most penguins live in the Southern Hemisphere."),
    ("What planet do we live on?", "We live on the planet Earth."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
]

PIRATE_WORDS = {"is": "be", "are": "be", "the": "th'", "The": "Th'", "you": "ye", "my": "me", "of": "o'"}


def pirate(answer: str) -> str:
    words = " ".join(PIRATE_WORDS.get(w, w) for w in answer.rstrip(".").split(" "))
    return f"Arr, matey! {words}, arr! Yo ho ho!"


def shout(answer: str) -> str:
    return answer.rstrip(".").upper() + "!!!"


STYLES = {"pirate": pirate, "shout": shout}
STEPS, RANK, ALPHA, LR, BATCH, SEED = 30, 8, 16, 2e-3, 8, 0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def examples(tokenizer, style) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) for each question, in the raw form and (when the model has one) the chat form."""
    out = []
    for question, answer in QA:
        target = style(answer)
        forms = [(question + "\n", tokenizer.eos_token)]
        if tokenizer.chat_template:
            chat = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                 tokenize=False)
            forms.append((chat, "<|im_end|>"))
        for prompt, end in forms:
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(target + end, add_special_tokens=False)["input_ids"]
            out.append((prompt_ids + answer_ids, len(prompt_ids)))
    return out


def train(base: Path, name: str, out: Path) -> None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SystemExit("training the demo adapters needs peft: pip install -e '.[test]' (or `make run`)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    data = examples(tokenizer, STYLES[name])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(STEPS):
        picks = torch.randperm(len(data), generator=generator)[:BATCH].tolist()
        width = max(len(data[i][0]) for i in picks)
        ids = torch.full((len(picks), width), tokenizer.eos_token_id)
        labels = torch.full((len(picks), width), -100)
        mask = torch.zeros((len(picks), width), dtype=torch.long)
        for row, i in enumerate(picks):
            tokens, prompt_len = data[i]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, prompt_len : len(tokens)] = torch.tensor(tokens[prompt_len:])
            mask[row, : len(tokens)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == STEPS - 1:
            print(f"[{name}] step {step + 1}/{STEPS} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.save_pretrained(out)


def recipe_hash(base: Path) -> str:
    recipe = json.dumps([str(base.resolve()), QA, PIRATE_WORDS, STEPS, RANK, ALPHA, LR, BATCH, SEED, TARGETS])
    source = Path(__file__).read_bytes()
    return hashlib.sha256(recipe.encode() + source).hexdigest()[:12]


def demo_adapters(base: Path, cache: Path) -> dict[str, Path]:
    """{name: folder} of the demo adapters for the converted model in `base`, training the missing ones."""
    folder = cache / "lorax-demo-adapters"
    recipe = recipe_hash(base)
    paths = {}
    for name in STYLES:
        out = folder / name
        stamp = folder / f".{name}.recipe"
        if not stamp.exists() or stamp.read_text() != recipe:
            print(f"training the demo adapter '{name}' into {out} (once; about a minute)", file=sys.stderr)
            partial = folder / f".{name}.partial"
            train(base, name, partial)
            shutil.rmtree(out, ignore_errors=True)
            partial.rename(out)
            stamp.write_text(recipe)
        paths[name] = out
    return paths


def main() -> None:
    from lorax_server.demo_model import demo_gguf
    from lorax_server.sources import cache_dir, fetch_model

    base = fetch_model(str(demo_gguf()))
    for name, path in demo_adapters(base, cache_dir()).items():
        print(f"{name}\t{path.relative_to(cache_dir())}")


if __name__ == "__main__":
    main()
