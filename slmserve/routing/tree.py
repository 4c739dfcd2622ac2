"""A multi-tenant approximate radix tree: which replica ("tenant") was sent which prefix.

Routers cannot see inside the replicas' KV caches, so they keep a model of them: every routed
prompt is inserted under the replica it went to, and each replica's share is trimmed LRU-first
when it outgrows what that replica can hold. SGLang's router keeps the same structure (one
``Tree`` per model, tenants = worker URLs, text characters as keys); ours stores int keys —
token ids, or character codes when the router only has text — in read-only numpy arrays so an
edge compare is one ``memcmp`` (as in :mod:`slmserve.cache.radix`).

Invariant: tenants are *prefix-closed*: a tenant present on a node is present on all its
ancestors (insert marks the whole path; eviction removes a tenant from a node only when no
child still holds it). So a tenant's match length is the depth of the deepest node on the key's
path that holds it, and a node without tenants has no children and is dropped.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

_EMPTY = np.empty(0, np.int64)


def as_key(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """A 1-D int64 array of ``tokens`` (no copy when it already is one)."""
    key = np.asarray(tokens, dtype=np.int64)
    if key.ndim != 1:
        raise ValueError(f"a routing key must be 1-D, got shape {key.shape}")
    return key


TEXT_BLOCK = 3
"""Characters packed into one key unit when routing on text (21 bits each: exact, no hash)."""


def text_key(text: str) -> np.ndarray:
    """Route on text without a tokenizer: blocks of three characters, packed into one int64.

    SGLang's router matches characters; blocks keep the tree three times smaller and make one
    key unit about one token (English averages ~4 characters per token), so costs and quanta
    counted in key units mean roughly the same whether the router has a tokenizer or not.
    Code points fit 21 bits, so the packing is exact: equal keys are equal texts. Prefixes are
    preserved up to the last, partial block.
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    pad = -len(codes) % TEXT_BLOCK
    if pad:
        codes = np.concatenate([codes, np.zeros(pad, np.int64)])
    blocks = codes.reshape(-1, TEXT_BLOCK)
    return blocks[:, 0] | (blocks[:, 1] << 21) | (blocks[:, 2] << 42)


class _Node:
    __slots__ = ("children", "kb", "key", "parent", "tenants")

    def __init__(self, key: np.ndarray, parent: _Node | None) -> None:
        self.key = key
        self.kb = key.tobytes()
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.tenants: dict[str, int] = {}
        """Tenant -> logical time of its last insert or match through this node."""


class Match(NamedTuple):
    length: int
    """Longest prefix of the key found in the tree (under any tenant)."""
    per_tenant: dict[str, int]
    """Each tenant's own longest prefix (tenants with none are absent)."""
    deepest: tuple[str, ...]
    """Tenants of the deepest node the key reached, most recently used first."""


class PrefixTree:
    """Radix tree over int keys; each node records which tenants hold it, with an LRU stamp."""

    def __init__(self) -> None:
        self.root = _Node(_EMPTY, None)
        self._clock = itertools.count(1)
        self._size: dict[str, int] = {}

    # ------------------------------------------------------------------ queries

    def size(self, tenant: str) -> int:
        """Key units (tokens or characters) held by ``tenant``."""
        return self._size.get(tenant, 0)

    def tenants(self) -> list[str]:
        return sorted(self._size)

    def match(self, key: Sequence[int] | np.ndarray) -> Match:
        """Walk ``key`` down the tree. Mutates nothing."""
        key = as_key(key)
        kb = key.tobytes()
        n, pos = len(key), 0
        node = self.root
        per: dict[str, int] = {}
        while pos < n:
            child = node.children.get(int(key[pos]))
            if child is None:
                break
            k = len(child.key)
            if kb[8 * pos : 8 * (pos + k)] != child.kb:
                k = _common_len(child.key, key[pos:])
            pos += k
            node = child
            for t in child.tenants:
                per[t] = pos
            if k < len(child.key):
                break
        deepest = tuple(sorted(node.tenants, key=lambda t: (-node.tenants[t], t)))
        return Match(pos, per, deepest if node is not self.root else ())

    # ------------------------------------------------------------------ updates

    def insert(self, key: Sequence[int] | np.ndarray, tenant: str) -> None:
        """Record that ``tenant`` now holds ``key`` (and so every prefix of it)."""
        key = as_key(key)
        now = next(self._clock)
        self._size.setdefault(tenant, 0)
        kb = key.tobytes()
        n, pos = len(key), 0
        node = self.root
        while pos < n:
            child = node.children.get(int(key[pos]))
            if child is None:
                leaf = _Node(key[pos:].copy(), node)
                node.children[int(key[pos])] = leaf
                self._claim(leaf, tenant, now)
                return
            k = len(child.key)
            if kb[8 * pos : 8 * (pos + k)] != child.kb:
                k = _common_len(child.key, key[pos:])
                if k < len(child.key):
                    child = self._split(child, k)
            self._claim(child, tenant, now)
            node = child
            pos += k

    def touch(self, key: Sequence[int] | np.ndarray, tenant: str) -> None:
        """Refresh ``tenant``'s LRU stamps along its match of ``key`` (SGLang does on match)."""
        key = as_key(key)
        now = next(self._clock)
        kb = key.tobytes()
        n, pos = len(key), 0
        node = self.root
        while pos < n:
            child = node.children.get(int(key[pos]))
            if child is None or tenant not in child.tenants:
                return
            k = len(child.key)
            if kb[8 * pos : 8 * (pos + k)] != child.kb:
                k = _common_len(child.key, key[pos:])
            child.tenants[tenant] = now
            node = child
            pos += k
            if k < len(child.key):
                return

    def _claim(self, node: _Node, tenant: str, now: int) -> None:
        if tenant not in node.tenants:
            self._size[tenant] += len(node.key)
        node.tenants[tenant] = now

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut ``node``'s edge after ``k`` units; the new upper half inherits its tenants."""
        parent = node.parent
        assert parent is not None
        upper = _Node(node.key[:k], parent)
        upper.tenants = dict(node.tenants)
        parent.children[int(node.key[0])] = upper
        node.key = node.key[k:]
        node.kb = node.key.tobytes()
        node.parent = upper
        upper.children[int(node.key[0])] = node
        return upper

    # ------------------------------------------------------------------ eviction

    def evict(self, tenant: str, max_size: int) -> int:
        """Drop ``tenant``'s least recently used leaves until it holds at most ``max_size``.

        Returns the key units dropped. O(nodes) to find the tenant's leaves, then a heap.
        """
        if self.size(tenant) <= max_size:
            return 0
        heap = [(node.tenants[tenant], id(node), node) for node in self._leaves_of(tenant)]
        heapq.heapify(heap)
        dropped = 0
        while heap and self._size[tenant] > max_size:
            _, _, node = heapq.heappop(heap)
            dropped += self._release(node, tenant)
            parent = node.parent
            if parent is not None and parent is not self.root and self._is_leaf_of(parent, tenant):
                heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))
        return dropped

    def remove_tenant(self, tenant: str) -> None:
        """Forget everything ``tenant`` held (a replica that went down lost its cache)."""
        stack = [self.root]
        holders: list[_Node] = []
        while stack:
            node = stack.pop()
            stack.extend(c for c in node.children.values() if tenant in c.tenants)
            if node is not self.root:
                holders.append(node)
        for node in reversed(holders):  # children before parents
            self._release(node, tenant)
        self._size.pop(tenant, None)

    def _release(self, node: _Node, tenant: str) -> int:
        del node.tenants[tenant]
        self._size[tenant] -= len(node.key)
        if not node.tenants and node.parent is not None:
            del node.parent.children[int(node.key[0])]
        return len(node.key)

    @staticmethod
    def _is_leaf_of(node: _Node, tenant: str) -> bool:
        return tenant in node.tenants and all(
            tenant not in c.tenants for c in node.children.values()
        )

    def _leaves_of(self, tenant: str) -> Iterator[_Node]:
        stack = [c for c in self.root.children.values() if tenant in c.tenants]
        while stack:
            node = stack.pop()
            below = [c for c in node.children.values() if tenant in c.tenants]
            if below:
                stack.extend(below)
            else:
                yield node

    def check(self) -> None:
        """Verify prefix-closure and the size counters (tests)."""
        sizes: dict[str, int] = dict.fromkeys(self._size, 0)
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            assert node.parent is not None
            if not node.tenants:
                raise AssertionError("a node without tenants stayed in the tree")
            if node.parent is not self.root and not set(node.tenants) <= set(node.parent.tenants):
                raise AssertionError("tenants are not prefix-closed")
            for t in node.tenants:
                sizes[t] = sizes.get(t, 0) + len(node.key)
            stack.extend(node.children.values())
        if sizes != self._size:
            raise AssertionError(f"size counters {self._size} != recount {sizes}")


def _common_len(edge: np.ndarray, rest: np.ndarray) -> int:
    """Length of the common prefix of ``edge`` and ``rest`` (they differ somewhere)."""
    n = min(len(edge), len(rest))
    neq = edge[:n] != rest[:n]
    return int(neq.argmax()) if neq.any() else n
