"""hf-paged: a paged KV cache (PagedAttention) for a plain ``model.generate``.

    import hf_paged
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="paged")
    out = model.generate(**inputs, return_dict_in_generate=True)
    hf_paged.cache_of(out).memory_stats()

Importing the package registers the ``"paged"`` attention and mask functions with transformers and
installs the generate hooks (both idempotent).
"""

from .attention import dense_attention, paged_attention_forward, paged_mask, register
from .block_pool import BlockPool, OutOfBlocksError
from .cache import CacheStateError, PagedCache
from .compat import cache_of
from .engine import GenerationResult, Request, generate_many, iter_generate_many
from .forward import PagedForward
from .prefix_cache import PrefixCache
from .generation import install
from .support import UnsupportedModelError, check_supported

__version__ = "0.1.0"

__all__ = [
    "BlockPool",
    "CacheStateError",
    "GenerationResult",
    "OutOfBlocksError",
    "PagedCache",
    "PagedForward",
    "PrefixCache",
    "Request",
    "UnsupportedModelError",
    "cache_of",
    "check_supported",
    "dense_attention",
    "generate_many",
    "iter_generate_many",
    "paged_attention_forward",
    "paged_mask",
]

register()
install()
