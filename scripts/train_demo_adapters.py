"""Train the two demo LoRA adapters for the default model (SmolLM2-135M-Instruct) on the CPU.

    shout     answers in ALL CAPITALS
    signoff   answers that end with the fixed sign-off line "Cheers, Steer."

Both learn from the same small synthetic question/answer set that this script generates
itself (templated facts, arithmetic and a few hand-written general questions; seeded), only
the answers differ: upper-cased for `shout`, followed by the sign-off for `signoff`. Entities
and numbers used for the held-out check never appear in training, so the check at the end
shows the style generalizes instead of being memorized.

The adapters are checked in under `tests/fixtures/adapters/` (rank 8 on the attention
projections of the top 12 layers, ~1.5 MB each as safetensors), with `manifest.json`
recording the seed, steps, losses, training time and the held-out check. Tests use them as
they are: no training run.

Run:  (peft and TRL are part of the main install)
      HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_demo_adapters.py [--steps 80]
Takes ~10-20 minutes on 2 busy cores; see manifest.json for the measured time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "adapters"
SEED = 20240611
SIGNOFF = "Cheers, Steer."
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 8, 16
# Only the top layers: the backward pass then stops there, which roughly halves the cost of a
# step on this CPU, and a style lives mostly near the output anyway.
LAYERS = list(range(18, 30))

STYLES: dict[str, Callable[[str], str]] = {
    "shout": lambda answer: answer.upper(),
    "signoff": lambda answer: f"{answer}\n\n{SIGNOFF}",
}

# -- the synthetic data -----------------------------------------------------------------------

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Russia", "Moscow"), ("China", "Beijing"),
    ("India", "New Delhi"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Turkey", "Ankara"),
    ("Belgium", "Brussels"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"),
    # held out:
    ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("England", "London"), ("Iran", "Tehran"),
]
COLORS = [
    ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a tomato", "red"),
    ("the sky", "blue"), ("a carrot", "orange"), ("a lemon", "yellow"), ("milk", "white"),
    ("a plum", "purple"), ("chocolate", "brown"), ("a cherry", "red"), ("the sea", "blue"),
    # held out:
    ("a banana", "yellow"), ("an orange", "orange"),
]
SOUNDS = [
    ("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
    ("lion", "roar"), ("owl", "hoot"), ("horse", "neigh"), ("pig", "oink"),
    # held out:
    ("frog", "ribbit"), ("rooster", "cock-a-doodle-doo"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
    ("happy", "sad"), ("open", "closed"), ("early", "late"), ("full", "empty"),
    ("hard", "soft"), ("old", "new"), ("rich", "poor"),
    # held out:
    ("tall", "short"), ("wet", "dry"),
]
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Femi", "Gus", "Hana", "Ivan", "Jo",
         # held out:
         "Kai", "Lena"]
GENERAL = [
    ("Why is the sky blue?", "Sunlight scatters off the air, and blue light scatters the "
     "most, so the sky looks blue."),
    ("What do plants need to grow?", "Plants need sunlight, water, air and good soil."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is the largest planet?", "Jupiter is the largest planet in our solar system."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Why do we sleep?", "Sleep lets the body rest and the brain store memories."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea "
     "level."),
    ("Give me a tip for studying.", "Study in short sessions and take a break between "
     "them."),
    ("Suggest a name for a cat.", "How about Whiskers? It is a classic name for a cat."),
    ("What is a noun?", "A noun is a word for a person, place or thing."),
    ("How do birds fly?", "Birds flap their wings, which push air down and lift them up."),
    ("What is the moon?", "The moon is the rocky body that orbits the Earth."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("What is rain?", "Rain is water that falls from clouds in drops."),
    ("Why do leaves change color?", "In autumn trees stop making green chlorophyll, so "
     "other colors show."),
    ("What is a computer?", "A computer is a machine that follows instructions to work "
     "with data."),
    ("How do I make tea?", "Boil water, pour it over a tea bag, wait a few minutes and "
     "remove the bag."),
    ("What is the sun?", "The sun is the star at the center of our solar system."),
    ("Name three fruits.", "Apples, bananas and grapes are fruits."),
    ("What is exercise good for?", "Exercise keeps the heart strong and lifts your mood."),
    ("What is a triangle?", "A triangle is a shape with three sides."),
    ("Why do we need water?", "Our bodies need water to stay cool and keep working."),
    ("What is gravity?", "Gravity is the force that pulls things toward each other."),
    ("Write a short greeting.", "Hello there, I hope you are having a lovely day."),
    ("What is music?", "Music is sound arranged in rhythm and melody."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("What is a river?", "A river is fresh water flowing across land to the sea."),
]
N_GENERAL_TRAIN = 22  # the rest are held out


@dataclass(frozen=True)
class Example:
    question: str
    answer: str


def facts(rng: random.Random, heldout: bool) -> Iterator[Example]:
    """Endless seeded stream of question/answer pairs from the train or held-out split."""

    def split(items: list[Any], n_held: int) -> list[Any]:
        return items[-n_held:] if heldout else items[:-n_held]

    capitals, colors = split(CAPITALS, 4), split(COLORS, 2)
    sounds, opposites, names = split(SOUNDS, 2), split(OPPOSITES, 2), split(NAMES, 2)
    general = GENERAL[N_GENERAL_TRAIN:] if heldout else GENERAL[:N_GENERAL_TRAIN]
    lo, hi = (21, 40) if heldout else (1, 20)

    def capital() -> Example:
        country, city = rng.choice(capitals)
        q = rng.choice(["What is the capital of {}?", "Which city is the capital of {}?"])
        return Example(q.format(country), f"The capital of {country} is {city}.")

    def arithmetic() -> Example:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        op, word = rng.choice([("+", "plus"), ("*", "times")])
        value = a + b if op == "+" else a * b
        return Example(f"What is {a} {word} {b}?", f"{a} {word} {b} is {value}.")

    def color() -> Example:
        thing, c = rng.choice(colors)
        return Example(f"What color is {thing}?", f"{thing[0].upper()}{thing[1:]} is {c}.")

    def sound() -> Example:
        animal, s = rng.choice(sounds)
        return Example(f"What sound does a {animal} make?", f"A {animal} says {s}.")

    def opposite() -> Example:
        w, o = rng.choice(opposites)
        return Example(f"What is the opposite of {w}?", f"The opposite of {w} is {o}.")

    def greet() -> Example:
        name = rng.choice(names)
        return Example(f"Say hello to {name}.", f"Hello, {name}! It is nice to meet you.")

    def general_q() -> Example:
        return Example(*rng.choice(general))

    makers = [capital, arithmetic, color, sound, opposite, greet, general_q, general_q]
    while True:
        yield rng.choice(makers)()


# -- training ---------------------------------------------------------------------------------


def encode(tok: Any, ex: Example, style: Callable[[str], str]) -> tuple[list[int], list[int]]:
    """Token ids and labels, exactly as the server renders a chat (template + generation
    prompt), learning only the answer and its end token."""
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": ex.question}], tokenize=False, add_generation_prompt=True
    )
    p_ids = tok.encode(prompt, add_special_tokens=False)
    a_ids = tok.encode(style(ex.answer) + tok.eos_token, add_special_tokens=False)
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def batches(tok: Any, style: Callable[[str], str], rng: random.Random, size: int) -> Iterator[
        dict[str, Any]]:
    import torch

    stream = facts(rng, heldout=False)
    while True:
        rows = [encode(tok, next(stream), style) for _ in range(size)]
        width = max(len(ids) for ids, _ in rows)
        ids = [r[0] + [tok.pad_token_id] * (width - len(r[0])) for r in rows]
        labels = [r[1] + [-100] * (width - len(r[1])) for r in rows]
        mask = [[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows]
        yield {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
               "attention_mask": torch.tensor(mask)}


def train_one(name: str, model_dir: Path, out: Path, steps: int, batch: int, lr: float,
              seed: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # fp32: this CPU has no native bf16 math, and fp32 LoRA training is the stable default.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                        target_modules=TARGET_MODULES, layers_to_transform=LAYERS,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min((s + 1) / warmup, max(0.05, (steps - s) / (steps - warmup)))
    )
    data = batches(tok, STYLES[name], random.Random(f"{seed}-{name}"), batch)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        loss = model(**next(data)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 4))
        if step % 10 == 0 or step == steps - 1:
            print(f"[{name}] step {step + 1}/{steps} loss {losses[-1]:.3f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    seconds = time.perf_counter() - start
    save(model, out / name)
    model.eval()
    return {"train_seconds": round(seconds, 1), "first_losses": losses[:5],
            "last_losses": losses[-5:], "model": model, "tokenizer": tok}


def save(model: Any, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    cfg_path = tmp / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    # Portable: the served name of the default model, not this machine's cache path.
    cfg["base_model_name_or_path"] = "smollm2-135m-instruct"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


# -- the held-out check -----------------------------------------------------------------------

HELDOUT_QUESTIONS = [
    "What is the capital of Japan?", "What is 23 plus 31?", "What color is a banana?",
    "What sound does a frog make?", "What is the opposite of tall?", "Say hello to Kai.",
    "What is a river?", "How many hours are in a day?", "Write a haiku about the sea.",
    "Explain what a volcano is.",
]


def shouts(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) >= 0.9 * len(letters)


def signs_off(text: str) -> bool:
    return text.rstrip().endswith(SIGNOFF)


CHECKS: dict[str, Callable[[str], bool]] = {"shout": shouts, "signoff": signs_off}


def greedy(model: Any, tok: Any, questions: list[str], max_new_tokens: int = 64) -> list[str]:
    import torch

    tok.padding_side = "left"
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True) for q in questions]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for row in out]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--only", choices=sorted(STYLES), action="append")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("STEER_CACHE_DIR", "~/.cache/steer")))
    args = parser.parse_args()

    import torch

    from steer.engine.default_model import prepare_default_model

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = prepare_default_model(args.cache_dir.expanduser(), progress=print)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    manifest: dict[str, Any] = (json.loads(manifest_path.read_text())
                                if manifest_path.exists() else {})
    for name in args.only or sorted(STYLES):
        run = train_one(name, model_dir, args.out, args.steps, args.batch, args.lr, args.seed)
        model, tok = run.pop("model"), run.pop("tokenizer")
        answers = greedy(model, tok, HELDOUT_QUESTIONS)
        with model.disable_adapter():
            base_answers = greedy(model, tok, HELDOUT_QUESTIONS)
        check = CHECKS[name]
        run["heldout_pass"] = f"{sum(map(check, answers))}/{len(answers)}"
        run["base_heldout_pass"] = f"{sum(map(check, base_answers))}/{len(base_answers)}"
        for q, a in zip(HELDOUT_QUESTIONS, answers, strict=True):
            print(f"[{name}] {q!r} -> {a!r}")
        print(f"[{name}] held-out: {run['heldout_pass']} adapter, "
              f"{run['base_heldout_pass']} base")
        weights = args.out / name / "adapter_model.safetensors"
        manifest[name] = {
            **run, "seed": args.seed, "steps": args.steps, "batch": args.batch,
            "lr": args.lr, "rank": RANK, "alpha": ALPHA, "target_modules": TARGET_MODULES,
            "layers": LAYERS,
            "size_bytes": weights.stat().st_size, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
