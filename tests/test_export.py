"""mixtune export: a run's model (full, LoRA adapter, or merged) at a kept step as a
from_pretrained directory that loads and generates, with a model card."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import addition_records, reverse_records, tiny_config, write_jsonl
from mixtune import cli, config
from mixtune.config import ModelConfig
from mixtune.engine import build, loop

LORA = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full fine-tune of the tiny random llama and a LoRA run on the built-in base model,
    both with a target and a constraint, 4 steps, evaluated and saved every 2."""
    tmp = tmp_path_factory.mktemp("export")
    data = tmp / "data"
    data.mkdir()
    write_jsonl(data / "add.jsonl", addition_records(200))
    write_jsonl(data / "rev.jsonl", reverse_records(120))
    out = {}
    for name, model in (
        ("full", None),
        ("lora", {"name_or_path": "builtin", "lora": LORA}),
    ):
        cfg = tiny_config(tmp, data, output_dir=str(tmp / name), max_steps=4)
        if model is not None:
            cfg["model"] = model
        cfg["evals"][0]["role"] = "target"
        cfg["evals"][1]["role"] = "constraint"
        cfg["train"].update(eval_every=2, save_every=2, keep_checkpoints=5)
        out[name] = (tmp / name, loop.train(config.from_dict(cfg)))
    return out


def generate(model, path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("12+3=")["input_ids"]])
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 3
    return out


def test_export_of_a_full_run(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run, summary = runs["full"]
    out = tmp_path / "out"
    assert cli.main(["export", str(run), str(out)]) == 0
    step = summary["selection"]["step"] or 0
    assert f"exported step {step} of {run}: {out}" in capsys.readouterr().out
    generate(AutoModelForCausalLM.from_pretrained(out), out)
    exported = load_file(str(out / "model.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    card = (out / "README.md").read_text()
    assert "| add | `" in card and "| rev | constraint | loss |" in card
    assert "mean weight" in card and "Weights over time" in card
    assert "the run's answer (final/)" in card
    assert (out / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (out / "tokenizer_config.json").read_text()
    )
    # another kept step, and refusals
    out4 = tmp_path / "step4"
    assert cli.main(["export", str(run), str(out4), "--step", "4"]) == 0
    ckpt = load_file(str(run / "checkpoints/step-000004/trainable.safetensors"))
    exported = load_file(str(out4 / "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in ckpt.items())
    assert "# full at step 4" in (out4 / "README.md").read_text()
    assert cli.main(["export", str(run), str(tmp_path / "m"), "--merge-lora"]) == 2
    assert cli.main(["export", str(run), str(out4)]) == 2  # not empty
    assert cli.main(["export", str(run), str(tmp_path / "x"), "--step", "3"]) == 2
    assert "the weights of step 3 are not kept" in capsys.readouterr().err


def test_lora_final_names_its_base_absolutely(runs):
    run, _ = runs["lora"]
    base = json.loads((run / "final" / "adapter_config.json").read_text())
    assert base["base_model_name_or_path"] == str(build.base_reference(ModelConfig()))
    assert base["base_model_name_or_path"].startswith("/")


def test_export_of_a_lora_run_loads_from_anywhere_merged_or_not(runs, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = runs["lora"]
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert cli.main(["export", str(run), str(adapter)]) == 0
    assert cli.main(["export", str(run), str(merged), "--merge-lora"]) == 0
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (merged / "adapter_config.json").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the base path must not depend on the working directory
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    a = generate(peft_model, adapter)
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    full = AutoModelForCausalLM.from_pretrained(merged)
    b = generate(full, merged)
    assert torch.equal(a, b)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        la, lb, lc = (m(ids).logits for m in (peft_model, full, again))
    assert torch.allclose(la, lb, atol=1e-5) and torch.equal(la, lc)
    assert "library_name: peft" in (adapter / "README.md").read_text()


def test_an_adapter_without_a_nameable_base_is_refused_unmerged(tmp_path, data_dir, capsys):
    cfg = tiny_config(tmp_path, data_dir, max_steps=2)
    cfg["model"]["lora"] = LORA
    loop.train(config.from_dict(cfg))
    run = tmp_path / "run"
    assert cli.main(["export", str(run), str(tmp_path / "a")]) == 2
    assert "built at random from model.config" in capsys.readouterr().err
    assert cli.main(["export", str(run), str(tmp_path / "b"), "--merge-lora"]) == 0
    gguf = ModelConfig(name_or_path="package:json", gguf_file="x.gguf")
    assert build.base_reference(gguf) is None
    assert build.base_reference(ModelConfig(name_or_path="org/model")) == "org/model"
