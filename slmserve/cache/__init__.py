"""KV memory: the slot pool (tensors + allocator) and the radix prefix cache over it."""

from slmserve.cache.kv_pool import KVCacheExhausted, KVPool, SlotAllocator
from slmserve.cache.radix import InsertResult, MatchResult, RadixCache, RadixNode

__all__ = [
    "InsertResult",
    "KVCacheExhausted",
    "KVPool",
    "MatchResult",
    "RadixCache",
    "RadixNode",
    "SlotAllocator",
]
