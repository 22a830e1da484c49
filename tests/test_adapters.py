"""torchhyper.adapters: generated adapters exported in PEFT's and diffusers' formats, loaded back
by those libraries' own loaders to 1e-5; one batch with an adapter per example."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.func import functional_call

from torchhyper import EmbeddingHyperNetwork, HyperNetwork, per_sample_call
from torchhyper.adapters import load_adapter, save_adapter, save_adapters

peft = pytest.importorskip("peft", reason="PEFT is not installed: pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers")
LoraConfig, PeftModel, get_peft_model = peft.LoraConfig, peft.PeftModel, peft.get_peft_model


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


MODELS = {
    "gpt2": (gpt2, ["c_attn", "c_proj", "c_fc"], True),
    "llama": (llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"], False),
}


def peft_pair(name: str) -> tuple[nn.Module, nn.Module]:
    """A PEFT model with LoRA, and a copy of its base model from before the wrap."""
    build, targets, fan_in_fan_out = MODELS[name]
    torch.manual_seed(0)
    base = build()
    fresh = copy.deepcopy(base)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0
    )
    return get_peft_model(base, config).eval(), fresh


def trained(hyper: nn.Module) -> nn.Module:
    """As after training: the update depends on the condition."""
    with torch.no_grad():
        for p in hyper.head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return hyper.eval()


@pytest.mark.parametrize("base", ["frozen", "learned"])
@pytest.mark.parametrize("name", list(MODELS))
def test_peft_loads_the_exported_adapter(name, base, tmp_path):
    """PeftModel.from_pretrained on the base model reproduces the hypernetwork's outputs; the
    folder holds the adapter alone (within 1.2x of its tensors' bytes plus a small config)."""
    model, fresh = peft_pair(name)
    hyper = trained(HyperNetwork(5, [16], model, include="*lora_*", base=base))
    if base == "learned":
        with torch.no_grad():
            for b in hyper.base:
                b.add_(torch.randn_like(b) * 0.05)  # a trained base is part of the adapter
    params = hyper(torch.randn(6, 5))
    tokens = torch.randint(0, 32, (2, 8))
    want = functional_call(model, params, (tokens,)).logits
    folder = save_adapter(model, params, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(fresh, folder).eval()
    torch.testing.assert_close(loaded(tokens).logits, want, rtol=0, atol=1e-5)
    weights = (folder / "adapter_model.safetensors").stat().st_size
    tensors = sum(v.numel() * v.element_size() for v in params.values())
    assert tensors <= weights <= 1.2 * tensors + 4096
    assert (folder / "adapter_config.json").stat().st_size < 4096
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    # Read back as tensors keyed like the model's parameters.
    back = load_adapter(model, folder)
    assert back.keys() == params.keys()
    for k, v in back.items():
        torch.testing.assert_close(v, params[k].detach(), rtol=0, atol=0)


def test_many_conditions_and_one_batch_of_adapters(tmp_path):
    """save_adapters writes a folder per condition; per_sample_call runs a batch in which every
    example has its own adapter (the base shared), equal to a loop."""
    model, fresh = peft_pair("gpt2")
    hyper = trained(EmbeddingHyperNetwork(4, 8, model, include="*lora_*", base="frozen"))
    params = hyper(torch.arange(3))
    folders = save_adapters(model, params, tmp_path, names=["a", "b", "c"])
    assert [f.name for f in folders] == ["a", "b", "c"]
    tokens = torch.randint(0, 32, (3, 1, 8))
    batched = per_sample_call(model, params, (tokens,)).logits
    loaded = PeftModel.from_pretrained(fresh, folders[1]).eval()
    for i in range(3):
        one = functional_call(model, {k: v[i] for k, v in params.items()}, (tokens[i],)).logits
        torch.testing.assert_close(batched[i], one, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded(tokens[1]).logits, batched[1], rtol=0, atol=1e-5)


def test_errors_say_what_to_do(tmp_path):
    model, _ = peft_pair("gpt2")
    full = HyperNetwork(5, [16], model, head="film", base="frozen")
    with pytest.raises(ValueError, match="not the adapter 'default''s: .*include='\\*lora_\\*'"):
        save_adapter(model, full(torch.randn(4, 5)), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    hyper = HyperNetwork(5, [16], model, include="*lora_*")
    with pytest.raises(ValueError, match="extra leading dimension"):
        save_adapter(model, hyper.per_sample(torch.randn(3, 5)), tmp_path / "y")
    with pytest.raises(ValueError, match="save a single condition with save_adapter"):
        save_adapters(model, hyper(torch.randn(3, 5)), tmp_path)
    params = hyper(torch.randn(3, 5))
    save_adapter(model, params, tmp_path / "z")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_adapter(model, params, tmp_path / "z")
    save_adapter(model, params, tmp_path / "z", overwrite=True)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers  # no scratch folders left behind
    with pytest.raises(TypeError, match="PEFT PeftModel or a diffusers model"):
        save_adapter(nn.Linear(2, 2), {}, tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="no adapter in"):
        load_adapter(model, tmp_path)


def test_diffusers_loads_the_exported_adapter(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=8,
    ).eval()  # fmt: skip
    fresh = copy.deepcopy(unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    for base in ("frozen", "learned"):
        hyper = trained(HyperNetwork(5, [16], unet, include="*lora_*", base=base))
        params = hyper(torch.randn(4, 5))
        x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 16)
        want = functional_call(unet, params, (x, t, text)).sample
        folder = save_adapter(unet, params, tmp_path / base)
        copy_ = copy.deepcopy(fresh)
        copy_.load_lora_adapter(
            str(folder), prefix=None, weight_name="pytorch_lora_weights.safetensors"
        )
        torch.testing.assert_close(copy_(x, t, text).sample, want, rtol=0, atol=1e-5)
        back = load_adapter(unet, folder)
        assert back.keys() == params.keys()
