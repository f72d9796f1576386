"""mixtune's mixers inside a plain Hugging Face ``Trainer`` (about 20 s on a laptop CPU).

Three training datasets: two built-in instruction domains (arithmetic, safety) and one of pure
noise (random responses: nothing to learn). DynamixSFT rewards the datasets on which a gradient
step helps, so the noise dataset loses weight; EXP3 rewards high training loss, so it gains.

    python examples/hf_trainer_mixture.py                     # dynamixsft
    python examples/hf_trainer_mixture.py --mixer exp3
    python examples/hf_trainer_mixture.py --mixer fixed --weights arithmetic=2,safety=1,noise=1
    python examples/hf_trainer_mixture.py --trl               # the same through TRL's SFTTrainer

The model is a tiny Llama built from the built-in base model's config (random init; add
``--pretrained`` for its pretrained weights). Everything runs offline.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from mixtune.builtin import base_model_path, load_domain
from mixtune.integrations import MixtureCallback, MixtureDataset


def tokenize(tok, prompt: str, response: str) -> dict:
    """Chat-formatted example; labels are -100 on the prompt (only the response is learned)."""
    user = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                   tokenize=False)
    p = tok(head, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"][:128]
    return {"input_ids": ids, "labels": [-100] * len(p) + ids[len(p):]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixer", default="dynamixsft",
                    choices=["uniform", "proportional", "temperature", "fixed", "exp3",
                             "dynamixsft"])
    ap.add_argument("--weights", default="arithmetic=1,safety=1,noise=1", help="for --mixer fixed")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pretrained", action="store_true", help="start from the built-in weights")
    ap.add_argument("--trl", action="store_true", help="use TRL's SFTTrainer")
    ap.add_argument("--output-dir", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)

    tok = AutoTokenizer.from_pretrained(base_model_path())
    rng = random.Random(0)
    words = [tok.decode([i]) for i in range(10, tok.vocab_size)]
    data = {name: [tokenize(tok, r["prompt"], r["response"])
                   for r in load_domain(name, "train", n=300)]
            for name in ("arithmetic", "safety")}
    data["noise"] = [tokenize(tok, r["prompt"], "".join(rng.choices(words, k=12)))
                     for r in load_domain("arithmetic", "train", n=300, seed=1)]
    mix = MixtureDataset(data, seed=0, pad_token_id=tok.pad_token_id)

    options = {
        "fixed": {"weights": {k: float(v) for k, v in
                              (kv.split("=") for kv in a.weights.split(","))}},
        "exp3": {"update_every": 5, "warmup_steps": 0},
        "dynamixsft": {"update_every": 10},
    }.get(a.mixer, {})
    out = a.output_dir or tempfile.mkdtemp(prefix="mixtune-hf-")
    callback = MixtureCallback(mix, a.mixer, options, metrics_path=f"{out}/metrics.jsonl")

    torch.manual_seed(0)
    if a.pretrained:
        model = AutoModelForCausalLM.from_pretrained(base_model_path())
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model_path()))
    common = dict(output_dir=out, max_steps=a.steps, per_device_train_batch_size=8,
                  learning_rate=1e-3, lr_scheduler_type="cosine", logging_steps=10,
                  save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    if a.trl:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True})
        trainer = SFTTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=mix.as_hf_dataset(), callbacks=[callback])
    else:
        trainer = Trainer(model, TrainingArguments(**common), train_dataset=mix,
                          data_collator=mix.collate, callbacks=[callback])
    trainer.train()

    print(f"\n{a.mixer}: mixture weights by update step ({out}/metrics.jsonl)")
    print("step  " + "  ".join(f"{n:>10}" for n in mix.names))
    for rec in trainer.state.log_history:
        if "mixtune/weight/noise" in rec:
            ws = "  ".join(f"{rec[f'mixtune/weight/{n}']:10.3f}" for n in mix.names)
            print(f"{rec['step']:>4}  {ws}")
    print("examples seen: " + ", ".join(f"{n}={c}" for n, c in zip(mix.names, callback.seen)))


if __name__ == "__main__":
    main()
