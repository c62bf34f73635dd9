"""Which models the paged cache serves, and the clear refusal of those it cannot (at load, or for
inputs it cannot serve). The served families' token equality is in test_generate_equality.py
(tiny_models.FAMILIES includes Gemma3n's KV-sharing layers and DeepSeek-V2/V3's latent attention)."""

import copy

import pytest
import torch
from tiny_models import make_config
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration, LlamaForCausalLM

from hf_paged import UnsupportedModelError, check_supported

HYBRIDS = {
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=64, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
                             mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16),
}


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_hybrid_models_are_refused_at_load(model_type):
    """Conv/SSM layers keep state a K/V cache has no room for: refused by name and reason, not a
    crash deep inside generate."""
    cfg = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               pad_token_id=0, **HYBRIDS[model_type])
    with pytest.raises(UnsupportedModelError, match=rf"model_type='{model_type}'.*conv/SSM/linear-attention state"):
        AutoModelForCausalLM.from_config(cfg, attn_implementation="paged")


def test_unknown_latent_attention_is_refused():
    cfg = make_config("llama")
    cfg.kv_lora_rank = 32
    with pytest.raises(UnsupportedModelError, match=r"latent attention is served for \['deepseek_v2', 'deepseek_v3'\]"):
        check_supported(LlamaForCausalLM, cfg)


def _gemma3_pair():
    cfg = Gemma3Config(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                         sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                         max_position_embeddings=256),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=100, boi_token_index=101, eoi_token_index=102)
    torch.manual_seed(0)
    stock = Gemma3ForConditionalGeneration._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    paged = Gemma3ForConditionalGeneration._from_config(copy.deepcopy(cfg), attn_implementation="paged").eval()
    paged.load_state_dict(stock.state_dict())
    return paged, stock


def test_multimodal_model_serves_text_and_refuses_images():
    """A vision-language model (Gemma 3) loads with "paged": text-only prompts give stock's tokens;
    image inputs are refused with the reason (image tokens attend both ways, and prompts are
    shared by token ids, which are the same for every image), in generate and in a plain forward."""
    paged, stock = _gemma3_pair()
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    for extra in (dict(), dict(num_beams=2)):
        assert torch.equal(paged.generate(input_ids=ids, attention_mask=mask, **kw, **extra),
                           stock.generate(input_ids=ids, attention_mask=mask, **kw, **extra))
    image_ids = torch.cat([torch.full((2, 1), 101), torch.full((2, 4), 100), torch.full((2, 1), 102), ids[:, :6]], 1)
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(UnsupportedModelError, match=r"model_type='gemma3'.*image, video and audio prompts are not "
                                                    r"supported.*Text-only prompts work"):
        paged.generate(input_ids=image_ids, attention_mask=torch.ones_like(image_ids), pixel_values=pixels, **kw)
    from hf_paged import PagedCache

    with pytest.raises(UnsupportedModelError, match=r"got \['pixel_values'\]"):
        paged(input_ids=image_ids, pixel_values=pixels, past_key_values=PagedCache())
