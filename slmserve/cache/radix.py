"""Radix tree over token ids that maps cached token runs to KV slot runs (page size 1).

Design choices, and why (SGLang's ``RadixCache`` is the reference point, see
``docs/cache.md``):

- Matching comes in three strengths. ``match_length`` (the scheduler's per-round refresh of
  the whole waiting queue) gathers no slots and can resume from the node an earlier call
  reached, so a request whose path did not change costs one dict lookup. ``match_prefix``
  returns the slots and never mutates the tree. ``match_prefix(split=True)`` (admission)
  splits an edge the match ends inside, so the node to lock covers exactly the matched
  tokens and never pins the edge's unused tail against eviction.
- Prefix comparison is one ``bytes`` compare (a ``memcmp``) on the common case of a fully
  matching edge; only a mismatching edge pays for a numpy ``!=``/``argmax`` to find where. No
  Python loop ever runs over tokens.
- LRU uses a logical clock bumped once per ``insert``/``lock``, and evictable leaves live in a
  heap with lazy deletion (``_evictable`` maps each evictable leaf to the timestamp of its one
  valid heap entry). Nodes enter and leave that set as their state changes, so ``evict`` pops
  only what it frees instead of re-heapifying every leaf on each call.
- ``lock_ref`` of a node counts the locks held on it or on any descendant (``lock`` increments
  the whole path to the root), so a node is evictable exactly when its ``lock_ref`` is 0 and it
  has no children.
- Slot and key arrays stored in nodes are read-only, so they can be handed to callers without
  a copy and cannot be corrupted by them.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from slmserve.cache.kv_pool import SlotAllocator

_EMPTY = np.empty(0, dtype=np.int64)
_EMPTY.flags.writeable = False


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only copy of ``a`` (never a view of a caller's buffer)."""
    out = a.copy()
    out.flags.writeable = False
    return out


def _as_tokens(tokens: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be a 1-D sequence, got shape {arr.shape}")
    return arr


def _concat(pieces: list[np.ndarray]) -> np.ndarray:
    if not pieces:
        return _EMPTY
    if len(pieces) == 1:
        return pieces[0]  # read-only node array (or a view of one): safe to share
    return np.concatenate(pieces)


class RadixNode:
    """One edge of the tree: a run of tokens and the KV slots that hold them.

    Callers treat it as an opaque handle to pass back to :meth:`RadixCache.lock` and
    :meth:`RadixCache.unlock`; the fields are public for tests and debugging only.
    """

    __slots__ = (
        "_kb",
        "children",
        "key",
        "last_access",
        "lock_ref",
        "parent",
        "slots",
    )

    def __init__(
        self,
        key: np.ndarray,
        slots: np.ndarray,
        parent: RadixNode | None,
        *,
        lock_ref: int = 0,
        last_access: int = 0,
    ) -> None:
        self.key = key
        self._kb = key.tobytes()  # the same tokens as bytes: an edge compare is one memcmp
        self.slots = slots
        self.parent = parent
        self.children: dict[int, RadixNode] = {}
        self.lock_ref = lock_ref
        self.last_access = last_access

    def __repr__(self) -> str:
        head = self.key[:4].tolist()
        more = "..." if len(self.key) > 4 else ""
        return (
            f"RadixNode(len={len(self.key)}, key={head}{more}, lock_ref={self.lock_ref}, "
            f"children={len(self.children)}, last_access={self.last_access})"
        )


Touch = tuple["RadixNode", int | None]
"""A change :meth:`RadixCache.take_touched` reports (see there)."""

Mark = tuple["RadixNode", int]
"""Where :meth:`RadixCache.match_length` stopped, to resume from next time: the last fully
matched node and the depth where its edge ends."""


class MatchResult(NamedTuple):
    length: int
    """Number of leading tokens found in the tree."""
    node: RadixNode
    """Deepest node the match reached (maybe only partly); lock it to pin the matched slots."""
    slots: np.ndarray
    """int64 slots of the matched prefix, ``len(slots) == length``. May share memory with
    the tree (then it is read-only): never write into it."""


class InsertResult(NamedTuple):
    prefix_len: int
    """How many leading tokens were already in the tree before this insert."""
    node: RadixNode
    """The node ending exactly at ``len(tokens)`` (the handle to lock next)."""
    slots: np.ndarray
    """The tree's slots for the whole sequence; the caller must switch to these (and, as
    with :class:`MatchResult`, never write into them)."""


class RadixCache:
    """Prefix cache over a :class:`SlotAllocator`: match, insert, lock, LRU-evict."""

    def __init__(self, allocator: SlotAllocator) -> None:
        self.allocator = allocator
        self.root = RadixNode(_EMPTY, _EMPTY, None)
        self._clock = 0
        self._evictable_size = 0
        self._protected_size = 0
        # Evictable leaf -> last_access at its valid heap entry. Heap entries whose timestamp
        # does not match (or whose node is absent) are stale and skipped when popped.
        self._evictable: dict[RadixNode, int] = {}
        self._heap: list[tuple[int, int, RadixNode]] = []
        self._seq = itertools.count()  # heap tie-break, so nodes are never compared
        self._touched: list[Touch] | None = None  # see watch()

    def _touch(self, node: RadixNode, token: int | None = None) -> None:
        """``node``'s child starting with ``token`` changed, or (``None``) ``node`` left the
        tree."""
        if self._touched is not None:
            self._touched.append((node, token))

    def watch(self) -> None:
        """Start recording touched nodes for :meth:`take_touched` (one consumer per cache)."""
        if self._touched is None:
            self._touched = []

    def take_touched(self) -> list[Touch]:
        """What changed since the last call, with repeats: ``(node, token)`` when the child of
        ``node`` starting with ``token`` was added, split or evicted; ``(node, None)`` when
        ``node`` left the tree. A match whose walk stopped at a node, about to look up a token,
        has the same answer as before unless that pair (or the node with ``None``) is here."""
        if self._touched is None:
            return []
        touched, self._touched = self._touched, []
        return touched

    # ----------------------------------------------------------------- sizes

    @property
    def evictable_size(self) -> int:
        """Tokens in unlocked nodes (all of them can be evicted, leaves first)."""
        return self._evictable_size

    @property
    def protected_size(self) -> int:
        """Tokens pinned by a lock on the node itself or on a descendant."""
        return self._protected_size

    @property
    def total_size(self) -> int:
        return self._evictable_size + self._protected_size

    # ------------------------------------------------------------ match / insert

    def _common_len(self, child: RadixNode, tokens: np.ndarray, tb: bytes, pos: int) -> int:
        """Length of the common prefix of ``child``'s edge and ``tokens[pos:]`` (>= 1).

        Called only when the whole edge does not match, so the result is < ``len(key)``.
        """
        n = min(len(child.key), len(tokens) - pos)
        if tb[8 * pos : 8 * (pos + n)] == child._kb[: 8 * n]:
            return n  # the tokens end inside the edge
        neq = child.key[:n] != tokens[pos : pos + n]
        return int(neq.argmax())  # first mismatch; there is one since the bytes differ

    def match_prefix(
        self, tokens: np.ndarray | Sequence[int], *, split: bool = False
    ) -> MatchResult:
        """Longest cached prefix of ``tokens``, with its slots. No LRU touch.

        A match ending inside an edge returns that edge's node (which reaches past the match),
        unless ``split``: then the edge is cut at the match and the new upper node returned,
        so locking it pins exactly the matched tokens.
        """
        tokens = _as_tokens(tokens)
        tb = tokens.tobytes()
        n = len(tokens)
        node, pos = self.root, 0
        pieces: list[np.ndarray] = []
        while pos < n:
            child = node.children.get(int(tokens[pos]))
            if child is None:
                break
            k = len(child.key)
            if tb[8 * pos : 8 * (pos + k)] != child._kb:  # not the whole edge (rare)
                k = self._common_len(child, tokens, tb, pos)
            pos += k
            if k < len(child.key):
                if split:
                    child = self._split(child, k)
                node = child
                pieces.append(child.slots[:k])
                break
            node = child
            pieces.append(child.slots)
        return MatchResult(pos, node, _concat(pieces))

    def match_length(
        self, tokens: np.ndarray | Sequence[int], resume: Mark | None = None
    ) -> tuple[int, Mark]:
        """Length of the longest cached prefix of ``tokens``, and a mark to resume from.

        ``resume`` is the mark an earlier call returned for a prefix of the same tokens. The
        path above a node never changes while the node is attached (eviction detaches leaves
        only; a split keeps the lower half in the original object, so the node's end depth
        holds), so the walk restarts at the mark's node when it is still attached. Which marks
        need a new walk at all is :class:`~slmserve.cache.tracker.PrefixTracker`'s business
        (from :meth:`take_touched`). Mutates nothing.
        """
        if not (type(tokens) is np.ndarray and tokens.dtype == np.int64 and tokens.ndim == 1):
            tokens = _as_tokens(tokens)  # the engine's keys already are; skip the conversion
        n = len(tokens)
        node, pos = self.root, 0
        if resume is not None:
            mark_node, depth = resume
            if depth <= n and (mark_node.parent is not None or mark_node is self.root):
                node, pos = mark_node, depth
        while pos < n:
            child = node.children.get(int(tokens[pos]))
            if child is None:
                break
            k = len(child.key)
            if tokens[pos : pos + k].tobytes() != child._kb:  # ends inside this edge
                length = pos + self._common_len(child, tokens, tokens.tobytes(), pos)
                return length, (node, pos)
            node, pos = child, pos + k
        return pos, (node, pos)

    def insert(
        self, tokens: np.ndarray | Sequence[int], slots: np.ndarray | Sequence[int]
    ) -> InsertResult:
        """Cache ``tokens`` -> ``slots``; free the caller's duplicates of already cached slots.

        The caller's slots for the already-present prefix that differ from the tree's are
        returned to the allocator (the tree keeps its own copy of that KV); slots equal to the
        tree's (reused from a match) are left alone. The unmatched tail becomes one new leaf.
        If the allocator rejects a duplicate (a caller bug), its ``ValueError`` propagates and
        the tree's content and LRU order are unchanged.
        """
        tokens = _as_tokens(tokens)
        slots = np.asarray(slots, dtype=np.int64)
        n = len(tokens)
        if slots.shape != (n,):
            raise ValueError(f"need one slot per token: {n} tokens, slots of shape {slots.shape}")
        if n == 0:
            return InsertResult(0, self.root, _EMPTY)
        self._clock += 1
        now = self._clock
        tb = tokens.tobytes()
        node, pos = self.root, 0
        path: list[RadixNode] = []
        while pos < n:
            child = node.children.get(int(tokens[pos]))
            if child is None:
                break
            k = len(child.key)
            if tb[8 * pos : 8 * (pos + k)] != child._kb:  # not the whole edge: split it
                k = self._common_len(child, tokens, tb, pos)
                child = self._split(child, k)
            path.append(child)
            node = child
            pos += k
        prefix_len = pos
        tree_slots = _concat([nd.slots for nd in path])
        if prefix_len:
            # Before touching anything: if the allocator rejects the caller's duplicates, the
            # tree has only been split (which changes neither content nor LRU order).
            theirs = slots[:prefix_len]
            if theirs.tobytes() != tree_slots.tobytes():
                self.allocator.free(theirs[theirs != tree_slots])
        for nd in path:
            nd.last_access = now
        if pos < n:
            leaf = RadixNode(_frozen(tokens[pos:]), _frozen(slots[pos:]), node, last_access=now)
            node.children[int(tokens[pos])] = leaf
            self._touch(node, int(tokens[pos]))
            self._evictable.pop(node, None)  # no longer a leaf
            self._evictable_size += n - pos
            tree_slots = np.concatenate([tree_slots, leaf.slots]) if pos else leaf.slots
            node = leaf
        # Of the touched nodes only the last can be a leaf: give it a fresh heap entry.
        self._note_if_evictable(node)
        return InsertResult(prefix_len, node, tree_slots)

    def _split(self, node: RadixNode, k: int) -> RadixNode:
        """Cut ``node``'s edge after ``k`` tokens; return the NEW parent holding the first k.

        The original object keeps the tail so handles held by callers stay valid; the parent
        copies its lock count (it is an ancestor of every lock below ``node``) and its time.
        """
        parent = node.parent
        assert parent is not None
        top = RadixNode(
            _frozen(node.key[:k]),
            _frozen(node.slots[:k]),
            parent,
            lock_ref=node.lock_ref,
            last_access=node.last_access,
        )
        parent.children[int(node.key[0])] = top
        self._touch(parent, int(node.key[0]))
        node.key = _frozen(node.key[k:])
        node._kb = node.key.tobytes()
        node.slots = _frozen(node.slots[k:])
        node.parent = top
        top.children[int(node.key[0])] = node
        return top

    # ------------------------------------------------------------------ locks

    def lock(self, node: RadixNode) -> None:
        """Pin ``node`` and its path to the root against eviction; counts as a use for LRU.

        Locking the root is a no-op (an empty match needs no pin).
        """
        if node is self.root:
            return
        if node.parent is None:
            raise ValueError(f"cannot lock {node!r}: it was evicted or the cache was reset")
        self._clock += 1
        now = self._clock
        evictable = self._evictable
        moved = 0
        while node is not self.root:
            if node.lock_ref == 0:
                moved += len(node.key)
                evictable.pop(node, None)
            node.lock_ref += 1
            node.last_access = now
            node = node.parent  # type: ignore[assignment]
        self._evictable_size -= moved
        self._protected_size += moved

    def unlock(self, node: RadixNode) -> None:
        """Undo one :meth:`lock`. Unlocking a node that holds no lock raises ``ValueError``."""
        if node is self.root:
            return
        if node.lock_ref <= 0:
            raise ValueError(f"unlock of {node!r} which is not locked")
        start = node
        moved = 0
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                moved += len(node.key)
            node = node.parent  # type: ignore[assignment]
        self._evictable_size += moved
        self._protected_size -= moved
        self._note_if_evictable(start)  # ancestors have a child, so only `start` can qualify

    # --------------------------------------------------------------- eviction

    def _note_if_evictable(self, node: RadixNode) -> None:
        """Give ``node`` a valid heap entry if it is an unlocked leaf (and lacks one)."""
        if node.lock_ref or node.children or node is self.root:
            return
        t = node.last_access
        if self._evictable.get(node) == t:
            return
        self._evictable[node] = t
        if len(self._heap) > 2 * len(self._evictable) + 64:
            # Mostly stale entries: rebuild from the live set. Amortised O(1) per push since
            # at least len(live) + 64 pushes happen between two rebuilds.
            self._heap = [(ts, next(self._seq), nd) for nd, ts in self._evictable.items()]
            heapq.heapify(self._heap)
        else:
            heapq.heappush(self._heap, (t, next(self._seq), node))

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` from unlocked leaves, least recently used first.

        Frees fewer only when fewer are evictable. Returns the number of tokens freed. A
        parent left childless and unlocked becomes an evictable leaf in turn.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        freed = 0
        chunks: list[np.ndarray] = []
        heap, evictable = self._heap, self._evictable
        while freed < num_tokens and heap:
            t, _, node = heapq.heappop(heap)
            if evictable.get(node) != t:
                continue  # stale entry
            del evictable[node]
            parent = node.parent
            assert parent is not None
            del parent.children[int(node.key[0])]
            self._touch(parent, int(node.key[0]))
            self._touch(node)
            node.parent = None
            chunks.append(node.slots)
            freed += len(node.key)
            self._note_if_evictable(parent)
        if chunks:
            self._evictable_size -= freed
            self.allocator.free(_concat(chunks))
        return freed

    def reset(self) -> None:
        """Drop every node and free all tree slots. Only allowed while nothing is locked."""
        if self._protected_size:
            raise RuntimeError(f"reset with {self._protected_size} tokens still locked")
        freed = self.tree_slots()
        for node in self._iter_nodes():
            node.parent = None  # stale handles can no longer be locked
            self._touch(node)
        self.root.children = {}
        self._touch(self.root)
        self._evictable.clear()
        self._heap = []
        self._evictable_size = 0
        self.allocator.free(freed)

    # ------------------------------------------------------------- inspection

    def _iter_nodes(self) -> list[RadixNode]:
        """Every non-root node, parents before children."""
        out: list[RadixNode] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def tree_slots(self) -> np.ndarray:
        """All slots held by the tree (a new array, in no particular order)."""
        return np.concatenate([_EMPTY, *(n.slots for n in self._iter_nodes())])

    def check_integrity(self) -> None:
        """Recompute every invariant from scratch; raise ``RuntimeError`` on a violation.

        O(tree size): for tests and debugging, not for the serving loop.
        """

        def fail(msg: str) -> None:
            raise RuntimeError(f"radix cache integrity: {msg}")

        root = self.root
        if root.parent is not None or len(root.key) or root.lock_ref:
            fail("root must have no parent, no key and lock_ref 0")
        evictable = protected = 0
        leaves: dict[RadixNode, int] = {}
        stack = [root]
        while stack:
            node = stack.pop()
            child_locks = 0
            for first, child in node.children.items():
                if child.parent is not node:
                    fail(f"{child!r} does not point back to its parent")
                if len(child.key) == 0 or int(child.key[0]) != first:
                    fail(f"{child!r} is filed under first token {first}")
                if child.key.shape != child.slots.shape or child._kb != child.key.tobytes():
                    fail(f"{child!r}: key, key bytes and slots disagree")
                if child.last_access > node.last_access and node is not root:
                    fail(f"{child!r} was used after its parent {node!r}")
                child_locks += child.lock_ref
                stack.append(child)
            if node is root:
                continue
            if node.lock_ref < child_locks:
                fail(f"{node!r} has lock_ref below its children's sum {child_locks}")
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
                if not node.children:
                    leaves[node] = node.last_access
        if (evictable, protected) != (self._evictable_size, self._protected_size):
            fail(
                f"sizes: counted evictable={evictable} protected={protected}, tracked "
                f"{self._evictable_size} / {self._protected_size}"
            )
        if leaves != self._evictable:
            fail(f"evictable leaf set out of date ({len(leaves)} vs {len(self._evictable)})")
        in_heap = {(id(node), t) for t, _, node in self._heap}
        missing = [nd for nd, t in leaves.items() if (id(nd), t) not in in_heap]
        if missing:
            fail(f"evictable leaves without a heap entry: {missing[:3]!r}")
        slots = self.tree_slots()
        if len(slots) != evictable + protected:
            fail("slot count differs from token count")
        if len(slots):
            if slots.min() < 0 or slots.max() >= self.allocator.num_slots:
                fail("slot id out of the allocator's range")
            if len(np.unique(slots)) != len(slots):
                fail("a slot is held twice by the tree")
            if np.isin(slots, self.allocator.free_slots()).any():
                fail("a tree slot is also free in the allocator")
