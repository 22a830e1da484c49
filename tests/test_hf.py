"""transformers, PEFT and diffusers models as downstreams.

One table of tiny random-init models, each built from a config object (never downloaded). A case
whose library is not installed is skipped (``pip install -e '.[hf,diffusion]'`` runs them all).
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from downstreams import perturb_update_
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from torchhyper import HyperNetwork, bind, per_sample_call, vmap_compatible

CONTEXT_DIM = 4
VOCAB = 100
B = 3  # parameter sets in a per-sample call
N = 2  # examples each parameter set sees


@dataclass
class HFCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, Tensor]]  # keyword inputs for a batch of n examples
    output: Callable[[Any], Tensor]  # the tensor that forward's output is compared by
    loss: Callable[[Any, dict[str, Tensor]], Tensor]
    include: str | None = None  # the parameters a hypernetwork generates (None: all)


def _lm_inputs(n: int) -> dict[str, Tensor]:
    ids = torch.randint(1, VOCAB, (n, 6))
    return {"input_ids": ids, "labels": ids}


def _lm_loss(y: Any, inputs: dict[str, Tensor]) -> Tensor:
    return y.loss.mean()


def _logits(y: Any) -> Tensor:
    return y.logits


def _sample(y: Any) -> Tensor:
    return y.sample


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.BertForMaskedLM(config)


def _llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _t5() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def _vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def _vit_inputs(n: int) -> dict[str, Tensor]:
    return {"pixel_values": torch.randn(n, 3, 8, 8), "labels": torch.randint(0, 3, (n,))}


def _unet() -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )  # fmt: skip


def _unet_inputs(n: int) -> dict[str, Tensor]:
    return {
        "sample": torch.randn(n, 4, 8, 8),
        "timestep": torch.randint(0, 1000, (n,)),
        "encoder_hidden_states": torch.randn(n, 5, 16),
    }


def _vae() -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, sample_size=8,
    )  # fmt: skip


def _lora_gpt2() -> nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
        lora_dropout=0.0,
    )  # fmt: skip
    return peft.get_peft_model(_gpt2(), config)


CASES = [
    HFCase("gpt2", _gpt2, _lm_inputs, _logits, _lm_loss),
    HFCase("bert", _bert, _lm_inputs, _logits, _lm_loss),
    HFCase("llama", _llama, _lm_inputs, _logits, _lm_loss),
    HFCase("t5", _t5, _lm_inputs, _logits, _lm_loss),
    HFCase("vit", _vit, _vit_inputs, _logits, _lm_loss),
    HFCase(
        "unet",
        _unet,
        _unet_inputs,
        _sample,
        lambda y, inputs: (y.sample - inputs["sample"]).square().mean(),
    ),
    HFCase(
        "autoencoder_kl",
        _vae,
        lambda n: {"sample": torch.randn(n, 3, 8, 8)},
        _sample,
        lambda y, inputs: (y.sample - inputs["sample"]).square().mean(),
    ),
    HFCase("peft_lora_gpt2", _lora_gpt2, _lm_inputs, _logits, _lm_loss, include="*lora_*"),
]
IDS = [c.name for c in CASES]


def context(n: int = 8) -> Tensor:
    return torch.randn(n, CONTEXT_DIM)


def generated_names(case: HFCase, module: nn.Module) -> list[str]:
    names = [n for n, _ in module.named_parameters()]
    return [n for n in names if case.include is None or fnmatch.fnmatchcase(n, case.include)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_keys_and_starts_at_the_downstream(case: HFCase):
    """Keys ordered like named_parameters(); with the default base the hypernetwork generates
    exactly the model's values at init, so functional_call equals the model's forward."""
    module = case.build().eval()
    hyper = HyperNetwork(CONTEXT_DIM, [16], module, include=case.include)
    params = hyper(context())
    assert list(params) == generated_names(case, module)
    own = dict(module.named_parameters())
    for name, value in params.items():
        torch.testing.assert_close(value, own[name].detach(), rtol=0, atol=0)
    inputs = case.inputs(2)
    with torch.no_grad():
        want = case.output(module(**inputs))
        got = case.output(functional_call(module, params, (), inputs))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _fresh_values(case: HFCase, names: list[str], draws: int) -> dict[str, Tensor]:
    values: dict[str, list[Tensor]] = {}
    for seed in range(draws):
        torch.manual_seed(1000 + seed)
        own = dict(case.build().named_parameters())
        for n in names:
            values.setdefault(n, []).append(own[n].detach().flatten())
    return {n: torch.cat(v).double() for n, v in values.items()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_base_none_follows_the_models_own_init(case: HFCase):
    """With base="none", every generated tensor has the statistics of fresh constructions of the
    model (whatever library initialized it): mean within 0.02 std, std within 20 %, constants
    (zero biases, norm weights of 1, PEFT's zero lora_B) exactly. The tolerances add 4 standard
    errors of the two estimates, which sampling cannot beat (a dense head draws each tensor
    afresh, without LoRAHead's exact standardization: a tensor of 4 values varies)."""
    torch.manual_seed(0)
    module = case.build()
    generated: dict[str, list[Tensor]] = {}
    for seed in range(4):
        torch.manual_seed(seed)
        hyper = HyperNetwork(CONTEXT_DIM, [16], module, include=case.include, base="none")
        with torch.no_grad():
            for n, v in hyper(context()).items():
                generated.setdefault(n, []).append(v.flatten())
    reference = _fresh_values(case, list(generated), draws=16)
    failures = []
    for n, fresh in reference.items():
        got = torch.cat(generated[n]).double()
        if (fresh - fresh[0]).abs().max() <= 1e-7 * (1 + fresh[0].abs()):
            if (got - fresh[0]).abs().max() > 1e-6:
                failures.append(f"{n}: constant {fresh[0]:.4g}, got spread {got.std():.3g}")
            continue
        mean, std = fresh.mean().item(), fresh.std().item()
        noise = 4 * (std / math.sqrt(fresh.numel()) + got.std().item() / math.sqrt(got.numel()))
        if abs(got.mean().item() - mean) > 0.02 * std + noise:
            failures.append(f"{n}: mean {got.mean():.4g} vs the model's {mean:.4g} (std {std:.3g})")
        # A std estimated from n values is off by about 1 / sqrt(2 n) of itself.
        spread = 0.2 + 4 * (1 / math.sqrt(2 * got.numel()) + 1 / math.sqrt(2 * fresh.numel()))
        if not 1 - spread <= got.std().item() / std <= 1 + spread:
            failures.append(f"{n}: std {got.std():.4g} vs the model's {std:.4g}")
    assert not failures, failures


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("gpt2", "llama")], ids=lambda c: c.name
)
def test_base_none_starts_at_the_models_own_loss(case: HFCase):
    """The end-to-end view of the init statistics: a fully generated language model starts at
    the loss of the model's own init (about log(vocab)), not at many times it."""
    module = case.build()
    inputs = case.inputs(8)
    hyper = HyperNetwork(CONTEXT_DIM, [16], module, base="none")
    with torch.no_grad():
        own = case.loss(module(**inputs), inputs).item()
        generated = case.loss(functional_call(module, hyper(context()), (), inputs), inputs).item()
    assert abs(own - math.log(VOCAB)) < 0.2
    assert generated < 1.1 * own


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_reaches_the_hypernetwork(case: HFCase):
    """Three Adam steps: the loss decreases and every trained parameter has had a gradient."""
    module = case.build().train().requires_grad_(False)
    if case.name == "unet" or case.name == "autoencoder_kl":
        module.eval()  # no dropout; GroupNorm has no running statistics
    hyper = HyperNetwork(CONTEXT_DIM, [16], module, include=case.include)
    optimizer = torch.optim.Adam(hyper.parameters(), lr=1e-2)
    inputs, c = case.inputs(4), context()
    losses, reached = [], set()
    for _ in range(3):
        loss = case.loss(functional_call(module, hyper(c), (), inputs), inputs)
        optimizer.zero_grad()
        loss.backward()
        reached |= {n for n, p in hyper.named_parameters() if p.grad is not None and p.grad.any()}
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(case.loss(functional_call(module, hyper(c), (), inputs), inputs).item())
    assert losses[-1] < losses[0], losses
    trained = {n for n, p in hyper.named_parameters() if p.requires_grad}
    assert trained - reached == set()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bind_restores_also_on_error(case: HFCase):
    module = case.build().eval()
    originals = dict(module.named_parameters())
    before = {n: p.detach().clone() for n, p in originals.items()}
    hyper = perturb_update_(HyperNetwork(CONTEXT_DIM, [16], module, include=case.include))
    params = hyper(context())
    inputs = case.inputs(2)
    with bind(module, params):
        got = case.output(module(**inputs))
    torch.testing.assert_close(got, case.output(functional_call(module, params, (), inputs)))
    assert got.requires_grad
    with pytest.raises(KeyError), bind(module, params):
        raise KeyError("the body fails")
    for n, p in module.named_parameters():
        assert p is originals[n]
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)


def _per_sample_inputs(case: HFCase) -> dict[str, Tensor]:
    draws = [case.inputs(N) for _ in range(B)]
    return {k: torch.stack([d[k] for d in draws]) for k in draws[0]}


def _loop(module: nn.Module, params: dict[str, Tensor], inputs: dict[str, Any], **extra) -> list:
    # The attention kernel per_sample_call uses (vmap_compatible's), so that only the batching
    # is compared, not two kernels' rounding.
    with sdpa_kernel([SDPBackend.MATH]):
        return [
            functional_call(
                module,
                {k: v[i] for k, v in params.items()},
                (),
                {**{k: v[i] for k, v in inputs.items()}, **extra},
            )
            for i in range(B)
        ]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_per_sample_call_matches_a_loop(case: HFCase):
    """One batched call against a Python loop of functional_call: outputs and gradients."""
    module = case.build().eval()
    hyper = perturb_update_(HyperNetwork(CONTEXT_DIM, [16], module, include=case.include)).eval()
    inputs = _per_sample_inputs(case)
    params = hyper.per_sample(context(B))
    got = case.output(per_sample_call(module, params, (), inputs))
    extra = (
        {"use_cache": False} if "use_cache" in inspect.signature(module.forward).parameters else {}
    )
    want = torch.stack([case.output(y) for y in _loop(module, params, inputs, **extra)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(want)
    leaves = list(params.values())
    for g, w in zip(
        torch.autograd.grad((got * weights).sum(), leaves, retain_graph=True),
        torch.autograd.grad((want * weights).sum(), leaves),
    ):
        # Float32 sums in another order (a batched kernel against per-sample ones): 1e-5 of
        # the gradient's scale.
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * (1 + w.abs().max().item()))


def _gpt2_per_sample() -> tuple[nn.Module, dict[str, Tensor], Tensor]:
    module = _gpt2().eval()
    hyper = perturb_update_(HyperNetwork(CONTEXT_DIM, [16], module)).eval()
    return module, hyper.per_sample(context(B)), torch.randint(1, VOCAB, (B, N, 6))


def test_per_sample_call_attention_masks():
    """A mask every sample shares goes in shared=; per-sample padding masks as a 4-D float mask
    (0 to attend, -inf not, causal part included); a batched 2-D mask is our typed error."""
    module, params, ids = _gpt2_per_sample()
    mask = torch.ones(N, 6, dtype=torch.long)
    mask[0, -2:] = 0
    got = per_sample_call(module, params, (ids,), shared={"attention_mask": mask}).logits
    want = torch.stack([y.logits for y in _loop(module, params, {"input_ids": ids},
                                                attention_mask=mask, use_cache=False)])  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    masks = torch.ones(B, N, 6, dtype=torch.long)
    masks[0, 0, -1] = masks[2, 1, -3:] = 0
    with pytest.raises(ValueError, match=r"shared=\{'attention_mask': mask\}.*4-D float mask"):
        per_sample_call(module, params, (ids,), {"attention_mask": masks})

    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    allowed = causal & masks.bool()[:, :, None, None, :]  # (B, N, 1, L, L)
    float_masks = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    got = per_sample_call(module, params, (ids,), {"attention_mask": float_masks}).logits
    want = [
        functional_call(module, {k: v[i] for k, v in params.items()}, (ids[i],),
                        {"attention_mask": masks[i], "use_cache": False}).logits
        for i in range(B)
    ]  # fmt: skip
    kept = masks.bool()  # padded positions' logits are not defined alike
    torch.testing.assert_close(got[kept], torch.stack(want)[kept], rtol=1e-5, atol=1e-5)


def test_per_sample_call_caches():
    """use_cache is False unless given; a cache asked for is our typed error."""
    module, params, ids = _gpt2_per_sample()
    assert module.config.use_cache
    out = per_sample_call(module, params, ids)
    assert out.get("past_key_values") is None
    with pytest.raises(ValueError, match="returned DynamicCache.*use_cache=False"):
        per_sample_call(module, params, (ids,), shared={"use_cache": True})
    with pytest.raises(ValueError, match=r"\['attention_mask'\] given in both"):
        per_sample_call(module, params, (ids,), {"attention_mask": ids}, shared={
            "attention_mask": ids[0]})  # fmt: skip


def test_generate_with_gradients():
    """The recipe for sampling with gradients: transformers wraps generate in torch.no_grad(),
    so call the undecorated function, inspect.unwrap(type(model).generate), under bind. The
    generated tokens carry no gradient; the logits that chose them do (output_logits=True)."""
    model = _gpt2().eval().requires_grad_(False)
    hyper = HyperNetwork(CONTEXT_DIM, [16], model)
    prompt = torch.randint(1, VOCAB, (2, 4))
    generate = inspect.unwrap(type(model).generate)
    with bind(model, hyper(context())):
        out = generate(model, prompt, max_new_tokens=3, do_sample=True, output_logits=True,
                       return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    tokens = out.sequences[:, prompt.shape[1] :]
    log_probs = torch.stack(out.logits, dim=1).log_softmax(-1)
    chosen = log_probs.gather(-1, tokens[..., None]).sum()  # e.g. a REINFORCE objective
    chosen.backward()
    assert all(p.grad is not None for p in hyper.parameters())
    # The decorated generate gives none, and bind restored the model's parameters.
    with bind(model, hyper(context())):
        assert not model.generate(prompt, max_new_tokens=1, output_logits=True, pad_token_id=0,
                                  return_dict_in_generate=True).logits[0].requires_grad  # fmt: skip
    assert isinstance(model.transformer.wte.weight, nn.Parameter)


def test_a_sampling_loop_with_gradients():
    """Without generate: a greedy loop that calls forward under bind (no cache)."""
    model = _gpt2().eval().requires_grad_(False)
    hyper = HyperNetwork(CONTEXT_DIM, [16], model)
    tokens = torch.randint(1, VOCAB, (2, 4))
    log_prob = torch.zeros(())
    with bind(model, hyper(context())):
        for _ in range(3):
            logits = model(tokens, use_cache=False).logits[:, -1]
            step = logits.argmax(-1, keepdim=True)
            log_prob = log_prob + logits.log_softmax(-1).gather(-1, step).sum()
            tokens = torch.cat([tokens, step], dim=1)
    log_prob.backward()
    assert all(p.grad is not None for p in hyper.parameters())


def test_vmap_compatible_forces_the_math_attention_kernel():
    """T5's learned position bias needs a mask gradient that the fused CPU kernel lacks under
    vmap: vmap_compatible forces the math kernel, and restores the choice on exit and on error."""
    flags = torch.backends.cuda  # the SDPA backend switches, CPU included
    before = (flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled())
    with vmap_compatible():
        assert flags.math_sdp_enabled()
        assert not flags.flash_sdp_enabled() and not flags.mem_efficient_sdp_enabled()
    assert (flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled()) == before
    with pytest.raises(KeyError), vmap_compatible():
        raise KeyError("the body fails")
    assert (flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled()) == before
