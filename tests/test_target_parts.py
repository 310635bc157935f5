"""Finding the text decoder of HF causal LMs (stages/target.py), the refusal of those without one, and the
norm weight a plain RMSNorm needs to reproduce the target's final norm."""
from __future__ import annotations

import pytest
import torch

from stages.target import decoder_parts, effective_norm_weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, intermediate_size=32)


def test_llama4_causal_lm_layers_are_under_model_model():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    model = Llama4ForCausalLM(Llama4TextConfig(**TINY, intermediate_size_mlp=32, num_local_experts=2))
    assert model.get_decoder() is model  # why get_decoder() alone is not enough
    parts = decoder_parts(model)
    assert parts.base is model.model and parts.layers is model.model.layers and parts.norm is model.model.norm


def test_multimodal_checkpoint_gives_its_language_model():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                  patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=dict(TINY, sliding_window=8),
                                                        vision_config=vision, mm_tokens_per_image=4))
    parts = decoder_parts(model)
    text = model.model.language_model
    assert parts.base is text and parts.layers is text.layers and parts.norm is text.norm
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():  # text-only data: the text model's final hidden state gives the model's logits
        hidden = parts.base(input_ids=ids).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), model(input_ids=ids).logits)


def test_a_model_without_a_text_decoder_is_refused_in_one_line():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4))
    with pytest.raises(ValueError) as info:
        decoder_parts(model)
    message = str(info.value)
    assert "\n" not in message and message.startswith("unsupported architecture MambaForCausalLM")


def test_dump_teacher_refuses_it_naming_the_target(tmp_path, tiny_llama):
    from click.testing import CliRunner
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    from stages.cli import main

    target = tmp_path / "mamba"
    MambaForCausalLM(MambaConfig(vocab_size=600, hidden_size=16, num_hidden_layers=2, state_size=4)).save_pretrained(
        target)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(target)
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    result = CliRunner().invoke(main, ["dump-teacher", "--target", str(target), "--data", str(data), "--out",
                                       str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 2
    assert f"target {target}: unsupported architecture MambaForCausalLM" in result.output


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gemma3"])
def test_effective_norm_weight_in_a_plain_rmsnorm_reproduces_the_norm(kind):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from eagle.model import RMSNorm

    norm = {"llama": LlamaRMSNorm, "gemma2": Gemma2RMSNorm, "gemma3": Gemma3RMSNorm}[kind](32, eps=1e-6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=g) * 0.3)
    weight = effective_norm_weight(norm)
    expected = norm.weight + (0.0 if kind == "llama" else 1.0)  # Gemma: x * (1 + weight), written out by hand
    torch.testing.assert_close(weight, expected.detach(), rtol=1e-5, atol=1e-5)
    plain = RMSNorm(32, 1e-6)
    with torch.no_grad():
        plain.weight.copy_(weight)
        x = torch.randn(4, 32, generator=g) * 3
        torch.testing.assert_close(plain(x), norm(x), rtol=1e-5, atol=1e-5)


def test_a_norm_that_is_not_an_rmsnorm_keeps_its_weight():
    norm = torch.nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    assert torch.equal(effective_norm_weight(norm), norm.weight.detach())
