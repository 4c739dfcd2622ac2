"""KV memory: the slot pool (tensors + allocator) and the radix prefix cache over it."""

from slmserve.cache.kv_pool import KVCacheExhausted, KVPool, SlotAllocator

__all__ = ["KVCacheExhausted", "KVPool", "SlotAllocator"]
