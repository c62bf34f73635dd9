"""One test per transformers internal hf_paged relies on (hf_paged/compat.py), named after it: a
transformers release that changes one of them fails here first, by name. CI runs this file on the
oldest supported release (5.17) and the newest."""

import copy
import inspect

import pytest
import torch
from tiny_models import FAMILIES, left_padded_batch, make_config, make_pair
from transformers import AutoModelForCausalLM, GenerationMixin
from transformers import masking_utils

import hf_paged
from hf_paged import PagedCache, compat
from hf_paged.forward import PagedForward


@pytest.fixture(scope="module")
def llama():
    return make_pair("llama")


def test_GenerationMixin_wrapped_methods_keep_their_leading_parameters(monkeypatch):
    """_prepare_cache_for_generation, _prefill, _check_and_adjust_attn_implementation, generate:
    wrapped with these parameters, checked at import; a change names the version."""
    compat.check_signatures()
    for name, (owner, expected) in compat.WRAPPED.items():
        method = getattr(owner, name)
        assert method._hf_paged  # installed
        assert list(inspect.signature(method.__wrapped__).parameters)[: len(expected)] == expected

    def changed(self, generation_config, model_kwargs, something_new):
        pass

    monkeypatch.setattr(GenerationMixin, "_prefill", changed)
    with pytest.raises(ImportError, match=r"transformers \d+\.\d+.*_prefill"):
        compat.check_signatures()


def test_wrappers_are_installed_once():
    import importlib

    before = GenerationMixin._prepare_cache_for_generation
    hf_paged.install()
    importlib.reload(hf_paged)
    assert GenerationMixin._prepare_cache_for_generation is before


def test_DeferredStopCheck_is_supported_params_and_sample_loop_asks_it(llama, monkeypatch):
    """generate's sampling loop asks DeferredStopCheck.is_supported(device, cache,
    cache_is_returned, is_assistant) whether to read its stop flag one step late; hf_paged answers
    for a PagedCache (generation.py). Without the class or those parameters the loop synchronises
    every step again: correct, but slower, so it fails here by name."""
    from transformers.generation import utils

    cls = compat.deferred_stop_check()
    assert cls is utils.DeferredStopCheck
    assert cls.is_supported._hf_paged  # installed
    params = list(inspect.signature(cls.is_supported.__wrapped__).parameters)
    assert params[: len(compat.DEFERRED_STOP_PARAMS)] == compat.DEFERRED_STOP_PARAMS
    # the loop asks it after the prefill, with the prefill's cache
    asked = []
    monkeypatch.setattr(cls, "is_supported", staticmethod(lambda *a, **k: asked.append(a[:3]) or False))
    paged, _ = llama
    ids, mask = left_padded_batch([3, 5], seed=1)
    out = paged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0,
                         eos_token_id=None, return_dict_in_generate=True)
    ((device, cache, returned),) = asked
    assert device == ids.device and cache is hf_paged.cache_of(out) and returned is True


@pytest.mark.parametrize("builder", ["create_causal_mask", "create_sliding_window_causal_mask",
                                     "create_chunked_causal_mask"])
def test_mask_builders_hand_get_mask_sizes_kv_offset_to_the_mask_function(llama, builder):
    """transformers' mask builders call cache.get_mask_sizes and pass the kv_offset it returns to
    the mask function unchanged: that is how the cache reaches ours (compat.MaskOffset)."""
    paged, _ = llama
    config = copy.deepcopy(paged.config)
    config.sliding_window, config.attention_chunk_size = 4, 4
    ids, mask = left_padded_batch([3, 5], seed=1)
    cache = PagedCache()
    embeds = torch.zeros(2, 5, config.hidden_size)
    # the cache is the fourth positional argument in 5.17 (past_key_values) and later (cache)
    fwd = getattr(masking_utils, builder)(config, embeds, mask, cache, None)
    assert isinstance(fwd, PagedForward) and fwd is cache._forward
    assert fwd.meta.batch == 2 and fwd.meta.q_len == 5


def test_mask_function_keyword_arguments(llama):
    """What our mask function reads by name: q_length, batch_size, attention_mask, kv_offset,
    device, dtype, config."""
    paged, _ = llama
    seen = {}

    def probe(*args, **kwargs):
        seen.update(kwargs)
        return None

    masking_utils.AttentionMaskInterface.register("hf_paged_probe", probe)
    try:
        config = copy.deepcopy(paged.config)
        config._attn_implementation = "hf_paged_probe"
        ids, mask = left_padded_batch([3, 5], seed=2)
        cache = PagedCache()
        masking_utils.create_causal_mask(config, torch.zeros(2, 5, config.hidden_size), mask, cache, None)
    finally:
        masking_utils.AttentionMaskInterface._global_mapping.pop("hf_paged_probe", None)
    assert {"q_length", "batch_size", "attention_mask", "kv_offset", "device", "dtype", "config"} <= set(seen)
    call = compat.read_mask_call(seen)
    assert call.cache is cache and (call.q_len, call.batch_size) == (5, 2) and call.config is config


def test_get_mask_sizes_query_length_argument():
    assert compat.mask_query_length(7) == 7
    assert compat.mask_query_length(torch.arange(4)) == 4  # older code paths pass cache_position
    kv_length, kv_offset = PagedCache().get_mask_sizes(6, 0)
    assert (kv_length, kv_offset) == (6, 0) and kv_offset.paged_cache is not None


def test_generate_cache_keyword_and_output_field(llama):
    """generate takes a user cache as `cache` (5.2x) or `past_key_values` (before), and returns it
    under the same name."""
    paged, _ = llama
    ids, mask = left_padded_batch([3, 5], seed=3)
    cache = PagedCache()
    key = compat.generate_cache_kwarg()
    out = paged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, return_dict_in_generate=True,
                         pad_token_id=0, **{key: cache})
    assert compat.cache_of(out) is cache and key in out


def test_prepare_cache_for_generation_makes_a_DynamicCache_we_replace(llama):
    paged, _ = llama
    ids, mask = left_padded_batch([3, 5], seed=4)
    out = paged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, return_dict_in_generate=True,
                         pad_token_id=0)
    assert type(compat.cache_of(out)) is PagedCache


def _prompt_lookup_generate(model, max_new_tokens):
    """Prompt-lookup (assisted) decoding over a prompt that repeats itself, so drafts are found
    (and some rejected: the cache is rolled back)."""
    pattern = torch.randint(3, 256, (7,), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([pattern, pattern, pattern[:4]]).unsqueeze(0)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                   prompt_lookup_num_tokens=3, pad_token_id=0)


def test_crop_convention_of_assisted_decoding(llama, monkeypatch):
    """Prompt-lookup (assisted) decoding rolls the cache back with crop: 5.23+ passes -n (drop n
    tokens) or 0, 5.17 the length to keep. compat.crop_length reads both; any other call fails here."""
    paged, _ = llama
    calls = []
    original = PagedCache.crop

    def recording(self, max_length):
        calls.append((int(max_length), self.get_seq_length()))
        return original(self, max_length)

    monkeypatch.setattr(PagedCache, "crop", recording)
    _prompt_lookup_generate(paged, max_new_tokens=14)
    assert calls
    negative = all(n <= 0 for n, _ in calls)
    lengths = all(0 <= n <= current for n, current in calls)
    assert negative or lengths, calls
    for n, current in calls:
        expected = current + n if negative else n
        assert compat.crop_length(current, n) == (expected if expected < current else None)


def test_activate_past_recording_call_of_assisted_decoding(llama, monkeypatch):
    """Assisted decoding asks the cache to record its past before drafting: 5.17-5.24 call
    activate_past_recording() with no argument, 5.25 with recurrent_states_to_keep (the drafted
    tokens, for linear-attention states). A PagedCache keeps every token either way; a new
    argument fails here, by name."""
    paged, _ = llama
    calls = []
    original = PagedCache.activate_past_recording

    def recording(self, *args, **kwargs):
        calls.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PagedCache, "activate_past_recording", recording)
    _prompt_lookup_generate(paged, max_new_tokens=6)
    assert calls
    for args, kwargs in calls:
        assert not args and set(kwargs) <= {"recurrent_states_to_keep"}, calls


def test_layer_types_of_hybrid_and_chunked_models():
    llama4 = make_config("llama4_text")
    assert compat.layer_types(llama4) == ["chunked_attention", "full_attention"]
    from transformers import Lfm2Config

    assert "conv" in compat.layer_types(Lfm2Config(layer_types=["conv", "full_attention"], num_hidden_layers=2))


def test_chunked_attention_layers_of_Llama4():
    model = AutoModelForCausalLM.from_config(make_config("llama4_text"), attn_implementation="paged")
    chunks = [compat.layer_chunk_size(layer.self_attn) for layer in model.model.layers]
    assert chunks == [8, None]


def test_is_kv_shared_layer_rule_of_Gemma3n():
    """Gemma3n's last num_kv_shared_layers read the K/V of the last earlier layer of their type:
    compat.kv_source_layer gives the layer transformers itself reads from."""
    model = AutoModelForCausalLM.from_config(make_config("gemma3n_text"), attn_implementation="paged")
    config = model.config
    sources = [compat.kv_source_layer(layer.self_attn) for layer in model.model.layers]
    assert sources == [0, 1, 0, 1]
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        assert attn.is_kv_shared_layer == (i >= 2)
        if hasattr(attn, "kv_shared_layer_index") and attn.is_kv_shared_layer:  # transformers 5.17
            assert attn.kv_shared_layer_index == sources[i]
        elif hasattr(config, "kv_sharing_modes"):  # later: the "store" layer of each type
            stores = {config.layer_types[j]: j for j, mode in enumerate(config.kv_sharing_modes) if mode == "store"}
            assert sources[i] == (stores[config.layer_types[i]] if attn.is_kv_shared_layer else i)


def test_expand_kv_of_DeepSeek_latent_attention(monkeypatch):
    """DeepSeek-V2/V3 cache two latents (one head each: kv_lora_rank and qk_rope_head_dim wide)
    and expand them with the attention module's expand_kv after reading the cache."""
    for family in ("deepseek_v2", "deepseek_v3"):
        config = make_config(family)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="paged")
        attn = model.model.layers[0].self_attn
        assert compat.latent_expander(attn) is not None
        shapes = []
        original = PagedCache.update

        def recording(self, key, value, layer_idx, *args, **kwargs):
            shapes.append((tuple(key.shape), tuple(value.shape)))
            return original(self, key, value, layer_idx, *args, **kwargs)

        monkeypatch.setattr(PagedCache, "update", recording)
        model(torch.tensor([[5, 6, 7]]), past_key_values=PagedCache())
        monkeypatch.undo()
        assert shapes[0] == ((1, 1, 3, config.kv_lora_rank), (1, 1, 3, config.qk_rope_head_dim))
        key, value = attn.expand_kv(torch.zeros(1, 1, 3, config.kv_lora_rank), torch.zeros(1, 1, 3, 8))
        assert key.shape[-1] == config.qk_nope_head_dim + config.qk_rope_head_dim
        assert value.shape[-1] == config.v_head_dim


def test_attention_backend_and_stateful_flags():
    """_supports_attention_backend (the model's attention goes through the interface), and how a
    model says it keeps recurrent state beside or instead of K/V: _is_stateful up to 5.24, the
    config's layer_types ("linear_attention" for Mamba's layers) from 5.25 (_is_stateful is gone).
    support.check_supported reads both; a model flagged by neither would pass as attention-only."""
    from transformers import BloomForCausalLM, LlamaForCausalLM, MambaConfig, MambaForCausalLM

    from hf_paged.support import ATTENTION_LAYER_TYPES

    assert compat.supports_attention_backend(LlamaForCausalLM) and not compat.is_stateful(LlamaForCausalLM)
    assert not compat.supports_attention_backend(BloomForCausalLM)
    recurrent_layers = set(compat.layer_types(MambaConfig(num_hidden_layers=2))) - ATTENTION_LAYER_TYPES
    assert compat.is_stateful(MambaForCausalLM) or recurrent_layers


def test_input_modalities_and_media_input_names():
    from transformers import Gemma3ForConditionalGeneration, LlamaForCausalLM

    assert "image" in compat.input_modalities(Gemma3ForConditionalGeneration)
    assert compat.input_modalities(LlamaForCausalLM) == {"text"}
    params = inspect.signature(Gemma3ForConditionalGeneration.forward).parameters
    assert "pixel_values" in params and compat.media_inputs({"pixel_values": torch.zeros(1)}) == ["pixel_values"]
    assert compat.media_inputs({"mm_encoder_outputs": {}, "input_ids": torch.zeros(1)}) == []


def test_forward_cache_keyword_and_logits_to_keep(llama):
    """The model forward takes the cache as `cache` (5.2x) or `past_key_values` (before), and
    `logits_to_keep`: the engine calls it with both."""
    paged, _ = llama
    assert compat.forward_cache_kwarg(paged) in inspect.signature(type(paged).forward).parameters
    assert compat.takes_logits_to_keep(paged)
    cache = PagedCache()
    out = paged(input_ids=torch.tensor([[5, 6, 7]]), logits_to_keep=1, **{compat.forward_cache_kwarg(paged): cache})
    assert out.logits.shape[1] == 1 and cache.seq_lens == [3]


def test_prepare_generation_config_resolves_as_generate(llama):
    """GenerationMixin._prepare_generation_config: the model's settings, transformers' defaults,
    then the arguments; what is not a generation setting comes back apart."""
    paged, _ = llama
    config, rest = compat.resolve_generation_config(paged, None, {"max_new_tokens": 7, "foo": 1})
    assert config.max_new_tokens == 7 and config.top_k == 50 and config.do_sample is False
    assert rest == {"foo": 1}
    # GenerationConfig._get_default_generation_params: the values unset settings take
    defaults = compat.generation_defaults()
    assert defaults["top_k"] == config.top_k and defaults["num_beams"] == 1 and defaults["do_sample"] is False


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_layers_ModuleList_of_num_hidden_layers(family):
    """The decode graph is captured in parts split at decoder layers: found as the ModuleList as
    long as num_hidden_layers (model.layers, transformer.h, decoder.layers, ...), in call order."""
    model, _ = make_pair(family)
    layers = compat.decoder_layers(model)
    n = model.config.get_text_config().num_hidden_layers
    assert len(layers) == n
    called = []
    hooks = [m.register_forward_pre_hook(lambda m, a, i=i: called.append(i)) for i, m in enumerate(layers)]
    ids = torch.tensor([[3, 5, 7]])
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert called == list(range(n))
