"""merge.py against naive references: identical experts, vertices, manual averages, peft."""

import pytest
import torch

from mixtune.errors import MixtuneError
from mixtune.planners.mergemix import merge


def _sd(seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 3, generator=g).to(dtype),
        "a.bias": torch.randn(4, generator=g).to(dtype),
        "steps": torch.tensor([7], dtype=torch.long),
    }


def test_merging_identical_experts_gives_that_expert():
    base, expert = _sd(0), _sd(1)
    tv = merge.task_vector(base, expert)
    out = merge.task_arithmetic(base, [tv, tv, tv], [0.2, 0.5, 0.3])
    lin = merge.linear([expert, expert, expert], [0.2, 0.5, 0.3])
    for k in expert:
        torch.testing.assert_close(out[k], expert[k])
        torch.testing.assert_close(lin[k], expert[k])


@pytest.mark.parametrize("k", [0, 1, 2])
def test_alpha_at_a_vertex_gives_that_expert(k, tmp_path):
    base, experts = _sd(0), [_sd(i) for i in (1, 2, 3)]
    tvs = [merge.task_vector(base, e) for e in experts]
    alpha = [1.0 if i == k else 0.0 for i in range(3)]
    out = merge.task_arithmetic(base, tvs, alpha)
    paths = [tmp_path / f"tv{i}.safetensors" for i in range(3)]
    for tv, p in zip(tvs, paths):
        merge.save_task_vector(tv, p)
    from_files = merge.task_arithmetic_files(base, paths, alpha)
    for name in base:
        torch.testing.assert_close(out[name], experts[k][name])
        torch.testing.assert_close(from_files[name], experts[k][name])


def test_merge_equals_a_manual_average():
    base, experts = _sd(0), [_sd(i) for i in (1, 2, 3)]
    alpha = [0.2, 0.3, 0.5]
    manual = {k: sum(a * e[k] for a, e in zip(alpha, experts)) for k in ("a.weight", "a.bias")}
    lin = merge.linear(experts, alpha)
    ta = merge.task_arithmetic(base, [merge.task_vector(base, e) for e in experts], alpha)
    for k, v in manual.items():
        torch.testing.assert_close(lin[k], v)
        torch.testing.assert_close(ta[k], v)  # on the simplex, task arithmetic = linear merge
    assert torch.equal(lin["steps"], base["steps"]) and lin["steps"].dtype == torch.long
    # off the simplex it is base + sum(alpha * tau), not an average
    ta2 = merge.task_arithmetic(base, [merge.task_vector(base, experts[0])], [2.0])
    torch.testing.assert_close(ta2["a.weight"], 2 * experts[0]["a.weight"] - base["a.weight"])


def test_bf16_merge_accumulates_in_fp32():
    base = {"w": torch.zeros(64, dtype=torch.bfloat16)}
    tiny = {"w": torch.full((64,), 2.0**-9)}  # below bf16 resolution near 1, exact in fp32
    big = {"w": torch.ones(64)}
    out = merge.task_arithmetic(base, [big] + [tiny] * 8, [1.0] + [1.0] * 8)
    assert out["w"].dtype == torch.bfloat16
    # fp32 sum 1 + 8 * 2^-9 = 1.015625 is representable in bf16; summing in bf16 would give 1.0
    assert torch.all(out["w"] == torch.tensor(1.015625, dtype=torch.bfloat16))


def test_bad_inputs_are_errors():
    base = _sd(0)
    with pytest.raises(MixtuneError, match="keys differ"):
        merge.task_vector(base, {"a.weight": base["a.weight"]})
    with pytest.raises(MixtuneError, match="coefficients"):
        merge.task_arithmetic(base, [{}], [0.5, 0.5])
    with pytest.raises(MixtuneError, match="not in the base"):
        merge.task_arithmetic(base, [{"nope": torch.zeros(1)}], [1.0])
    with pytest.raises(MixtuneError, match="non-float"):
        other = dict(_sd(1), steps=torch.tensor([8]))
        merge.linear([base, other], [0.5, 0.5])


def _tiny_peft(tmp_path, seed: int, **lora_kw):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model(
        "llama",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=40,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(hf)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(seed)
    model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", **lora_kw
        ),
    )
    with torch.no_grad():  # B starts at 0: give the adapter a real update
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    out = tmp_path / f"adapter{seed}"
    model.save_pretrained(out)
    merged = model.merge_and_unload().state_dict()
    return base_sd, out, merged


@pytest.mark.parametrize("kw", [{}, {"use_rslora": True, "alpha_pattern": {"q_proj": 16}}])
def test_lora_task_vector_matches_peft_merge_and_unload(tmp_path, kw):
    base, adapter_dir, merged = _tiny_peft(tmp_path, 1, **kw)
    tv = merge.adapter_task_vector(adapter_dir, base)
    assert tv and all(k in base for k in tv)
    out = merge.task_arithmetic(base, [tv], [1.0])
    for k in base:
        torch.testing.assert_close(out[k], merged[k], rtol=1e-5, atol=1e-6)


def test_merged_adapter_task_vectors_are_the_average_of_merged_models(tmp_path):
    base, d1, m1 = _tiny_peft(tmp_path, 1)
    _, d2, m2 = _tiny_peft(tmp_path, 2)
    tvs = [merge.adapter_task_vector(d, base) for d in (d1, d2)]
    out = merge.task_arithmetic(base, tvs, [0.25, 0.75])
    for k in base:
        torch.testing.assert_close(out[k], 0.25 * m1[k] + 0.75 * m2[k], rtol=1e-5, atol=1e-6)
