"""Tiny random models of each supported family, built from configs (no hub access needed)."""

import contextlib
import copy
import gc

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_paged  # registers "paged"
from hf_paged import testing

VOCAB = 256

# model_type -> (config overrides, stock attention implementation to compare against)
FAMILIES = {
    "llama": ({}, "sdpa"),
    "mistral": ({"sliding_window": 8}, "sdpa"),  # window shorter than the prompts
    "qwen2": ({}, "sdpa"),
    "qwen3": ({"head_dim": 16}, "sdpa"),
    "gemma2": (
        {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
         "query_pre_attn_scalar": 16, "layer_types": ["sliding_attention", "full_attention"]},
        "eager",  # sdpa cannot soft-cap
    ),
    "gemma3_text": (
        {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
         "layer_types": ["sliding_attention", "full_attention"]},
        "sdpa",
    ),
    "phi3": ({"pad_token_id": 0}, "sdpa"),
    "gpt2": ({"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}, "sdpa"),
    "opt": ({"ffn_dim": 128, "word_embed_proj_dim": 64, "max_position_embeddings": 512}, "sdpa"),
    "gpt_neox": ({"rotary_pct": 0.5}, "sdpa"),
    "starcoder2": ({}, "sdpa"),
    "olmo2": ({}, "sdpa"),
    # multi-head latent attention: the cache holds two latents, expanded to K/V of two widths
    "deepseek_v3": (
        {"num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": None, "qk_rope_head_dim": 8,
         "qk_nope_head_dim": 16, "v_head_dim": 12, "moe_intermediate_size": 32, "n_routed_experts": 4,
         "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
        "sdpa",
    ),
    "deepseek_v2": (
        {"num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 24, "qk_rope_head_dim": 8,
         "qk_nope_head_dim": 16, "v_head_dim": 12, "moe_intermediate_size": 32, "n_routed_experts": 4,
         "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1},
        "sdpa",
    ),
    # the last 2 of 4 layers read the K/V of the last earlier layer of their type
    "gemma3n_text": (
        {"num_hidden_layers": 4, "head_dim": 16, "sliding_window": 8, "num_kv_shared_layers": 2,
         "layer_types": ["sliding_attention", "full_attention"] * 2, "vocab_size_per_layer_input": VOCAB,
         "hidden_size_per_layer_input": 8, "laurel_rank": 8, "altup_num_inputs": 2},
        "sdpa",
    ),
    # Llama 4: layer 0 attends within chunks of 8 positions (layer_types "chunked_attention"), a
    # chunk shorter than the prompts; layer 1 is full attention without RoPE; MoE feed-forward
    "llama4_text": (
        {"intermediate_size": 64, "intermediate_size_mlp": 128, "head_dim": 16, "num_local_experts": 2,
         "num_experts_per_tok": 1, "attention_chunk_size": 8, "no_rope_layers": [1, 0]},
        "sdpa",
    ),
}

# Families whose decode step cannot be captured as a CUDA graph: generate decodes them eagerly (after one
# failed attempt, with a warning). Given no 2D attention mask (a graph cannot hold one: it grows every
# step), OPT builds an all-ones mask of the cache's length and GPT-2 checks the tokens for pads: both
# read a device value on the host.
GRAPH_FALLBACK = {"opt", "gpt2"}
# Families whose decode step is captured in some calls and synchronises in others (seen on the H200:
# DeepSeek's greedy steps were captured and replayed, a later call's capture hit a synchronising call
# in its MoE routing; Gemma3n's too): the first such call turns graphs off for the model, tokens unchanged.
GRAPH_FALLBACK_SOMETIMES = {"deepseek_v2", "deepseek_v3", "gemma3n_text"}

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def make_config(model_type):
    overrides, _ = FAMILIES[model_type]
    kwargs = dict(COMMON)
    if model_type in ("gpt2", "opt", "gpt_neox"):  # their configs have no num_key_value_heads
        kwargs.pop("num_key_value_heads")
    if model_type == "gpt2":
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                  "intermediate_size"):
            kwargs.pop(k)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def make_pair(model_type, seed=0, dtype=torch.float32):
    """(paged model, stock model) with identical random weights."""
    config = make_config(model_type)
    stock_impl = FAMILIES[model_type][1]
    torch.manual_seed(seed)
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=stock_impl, dtype=dtype)
    paged = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="paged", dtype=dtype)
    paged.load_state_dict(stock.state_dict())
    return paged.eval(), stock.eval()


def left_padded_batch(lengths, seed=0, vocab=VOCAB):
    return testing.left_padded_batch(lengths, vocab, seed=seed)


cache_of = hf_paged.cache_of


def assert_logits_close(out, ref, generate_kwargs, atol=2e-4):
    """With ``output_logits`` asked for, both outputs have one logits tensor per step and they
    agree; without it, neither has any."""
    if not generate_kwargs.get("output_logits"):
        assert out.get("logits") is None and ref.get("logits") is None
        return
    assert len(out.logits) == len(ref.logits) > 0
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@contextlib.contextmanager
def cyclic_gc_off():
    """Python's cyclic garbage collector off (after one collection): what is freed inside was
    freed by reference counting alone, as a user's loop frees it."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
