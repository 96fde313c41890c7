"""The planner's layer graph: intern layers, build the requirement graph, order it.

Internal to `layercache.plan.planner` (steps 1-2 of its module docstring), kept apart so each
file holds one concern. Everything here is keyed by small ints (layer ids) in flat lists,
and built with C-level bulk operations (map, zip, Counter, sort), because the planner
touches every layer of every image: 200,000 of them in the benchmark.

The requirement graph is stored as CSR: the children of layer ``g`` are
``tails[offsets[g]:offsets[g + 1]]``.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from layercache.oci.digest import Digest
    from layercache.oci.image import Layer, PlanImage

__all__ = ["LEFT_OUT", "Catalogue", "Order", "PlanInputError", "drain", "order", "sort_ties"]

_SIZE_BITS = 48  # sizes below 256 TiB pack with a sharing count into one int sort key
_repeat = itertools.repeat
#: A position after every position of an order: where a layer left out of it "is".
LEFT_OUT: Final = 1 << 62


def drain(calls: Iterator[object]) -> None:
    """Run an iterator (a map of setitem calls) to its end at C speed, keeping nothing."""
    collections.deque(calls, maxlen=0)


def sort_ties(items: list[int], keys: Sequence[int], tiebreak: Callable[[int], str]
              ) -> list[int]:
    """``items`` sorted by ``keys`` (one int per item, same order), ties by ``tiebreak``.

    One C-speed sort of ints; equal neighbours (rare) are found in C and only those runs
    sorted again by ``tiebreak(item)``. Returns a new list.
    """
    ranked = sorted(range(len(items)), key=keys.__getitem__)
    in_order = list(map(keys.__getitem__, ranked))
    ranked = list(map(items.__getitem__, ranked))
    ties = itertools.compress(itertools.count(), map(operator.eq, in_order, in_order[1:]))
    start = stop = -1
    for i in [*ties, -2]:
        if i != stop:  # not the continuation of the current run
            if stop > start:
                ranked[start : stop + 1] = sorted(ranked[start : stop + 1], key=tiebreak)
            start = i
        stop = i + 1
    return ranked


class PlanInputError(ValueError):
    """The planner's input contradicts itself; the message names the objects involved."""


class Catalogue:
    """Every distinct layer as an int id, and the global priority over them.

    ``image_ids[i]`` is image ``i``'s layers as ids; ``distinct[i]`` whether it is the first
    image with its manifest digest; ``shared_by[g]`` how many distinct manifests use layer
    ``g``; ``prio[g]`` its rank (0 = best: most shared, then largest, then digest) and
    ``by_prio`` the inverse.

    Raises:
        PlanInputError: one digest with two sizes or diff IDs, an impossible size, or one
            manifest digest with two layer lists.

    """

    def __init__(self, images: Sequence[PlanImage]) -> None:
        """Intern the layers of ``images`` (in the given order, which fixes the ids)."""
        every = [layer for image in images for layer in image.layers]
        digests = [layer.digest for layer in every]
        self.ids: dict[Digest, int] = dict(zip(dict.fromkeys(digests), itertools.count()))
        self.digests: list[Digest] = list(self.ids)
        flat = list(map(self.ids.__getitem__, digests))
        # layers[id] = the first Layer seen with that digest: writing in reverse, first wins.
        self.layers: list[Layer] = [every[0]] * len(self.digests) if every else []
        drain(map(self.layers.__setitem__, reversed(flat), reversed(every)))
        self.sizes = [layer.size for layer in self.layers]
        # Only layers that are not the very object seen first need comparing.
        others = map(operator.is_not, every, map(self.layers.__getitem__, flat))
        for layer in itertools.compress(every, others):
            known = self.layers[self.ids[layer.digest]]
            if (layer.size, layer.diff_id) != (known.size, known.diff_id):
                raise PlanInputError(
                    f"layer {layer.digest} has size {known.size}, diff ID {known.diff_id} in "
                    f"one image and {layer.size}, {layer.diff_id} in another"
                )
        for size in (min(self.sizes, default=0), max(self.sizes, default=0)):
            if not 0 <= size < 1 << _SIZE_BITS:
                digest = self.digests[self.sizes.index(size)]
                raise PlanInputError(f"layer {digest} has an impossible size {size}")

        ends = list(itertools.accumulate(len(image.layers) for image in images))
        rows = map(flat.__getitem__, map(slice, [0, *ends], ends))
        self.image_ids: list[tuple[int, ...]] = list(map(tuple, rows))
        self.distinct: list[bool] = []
        manifests: dict[Digest, tuple[int, ...]] = {}
        for image, row in zip(images, self.image_ids, strict=True):
            seen = manifests.setdefault(image.manifest_digest, row)
            if seen != row:
                raise PlanInputError(
                    f"manifest {image.manifest_digest} is listed with two layer lists "
                    f"(second time for {image.reference})"
                )
            self.distinct.append(seen is row)
        uses = itertools.chain.from_iterable(
            map(set, itertools.compress(self.image_ids, self.distinct))
        )
        counts = collections.Counter(uses)
        self.shared_by = list(map(counts.get, range(len(self.digests)), _repeat(0)))
        self.by_prio = self._rank()
        self.prio = [0] * len(self.by_prio)
        drain(map(self.prio.__setitem__, self.by_prio, itertools.count()))  # the inverse

    def _rank(self) -> list[int]:
        # Most shared, then largest: one packed int per layer; equal ones by digest.
        packed = zip(self.shared_by, self.sizes, strict=True)
        keys = [-((shared << _SIZE_BITS) + size) for shared, size in packed]
        return sort_ties(list(range(len(keys))), keys, self.digests.__getitem__)


@dataclass(slots=True)
class Order:
    """A platform's eligible layers in priority order.

    ``ids`` are layer ids; ``spans`` the ``[start, stop)`` positions of cycle units of
    several layers, which are held all-or-nothing; ``candidates`` counts every distinct
    layer of the images, left out or not.
    """

    ids: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    candidates: int = 0  # distinct layers of the images, eligible or not


def order(cat: Catalogue, members: Sequence[int], min_shared_by: int) -> Order:
    """Priority order of the layers of images ``members`` (indexes into the catalogue).

    Kahn's algorithm over the requirement graph, taking the highest-priority layer whose
    layers beneath are all listed. If that pass gets stuck on cycles, they are condensed and
    merged into its result (`_merge_cycles`). A layer used by fewer than ``min_shared_by``
    images is left out, and so is all that rests on it.
    """
    n = len(cat.digests)
    nodes: set[int] = set().union(*(cat.image_ids[i] for i in members))
    # Edge lower → upper, packed as lower * n + upper so that the set and sort stay in C.
    edges: set[int] = set()
    for i in members:
        if cat.distinct[i]:
            row = cat.image_ids[i]
            edges.update(map(operator.add, map(operator.mul, row, _repeat(n)), row[1:]))
    edges.difference_update(map(operator.mul, nodes, _repeat(n + 1)))  # a digest twice in a row
    packed = sorted(edges)
    heads = list(map(operator.floordiv, packed, _repeat(n)))
    tails = list(map(operator.mod, packed, _repeat(n)))
    starts = collections.Counter(heads)  # edges out of each layer; heads are sorted
    offsets = [0, *itertools.accumulate(map(starts.get, range(n), _repeat(0)))]
    counts = collections.Counter(tails)
    indeg = list(map(counts.get, range(n), _repeat(0)))
    shared_by = cat.shared_by
    bad = {g for g in nodes if shared_by[g] < min_shared_by} if min_shared_by > 1 else set()
    graph = _Graph(offsets, tails)
    popped, left_out = _kahn(cat, nodes, list(indeg), graph, bad)
    stuck = nodes.difference(popped)
    if not stuck:
        result = Order([g for g in popped if g not in left_out] if left_out else popped)
    else:
        feeds = set(itertools.compress(heads, map(stuck.__contains__, tails))).difference(stuck)
        result = _merge_cycles(cat, graph, (popped, left_out, stuck, feeds), indeg, bad)
    result.candidates = len(nodes)
    return result


@dataclass(slots=True)
class _Graph:
    offsets: list[int]
    tails: list[int]

    def children(self, g: int) -> list[int]:
        return self.tails[self.offsets[g] : self.offsets[g + 1]]


def _kahn(
    cat: Catalogue, nodes: set[int], indeg: list[int], graph: _Graph, bad: set[int]
) -> tuple[list[int], set[int]]:
    """Kahn's algorithm taking the highest-priority available node each time.

    ``indeg`` (consumed) counts each node's incoming edges. Returns every node popped, in
    order, and those of them left out: in ``bad`` or resting on a left-out node. Nodes on or
    above a cycle are never popped.
    """
    prio, by_prio, offsets, tails = cat.prio, cat.by_prio, graph.offsets, graph.tails
    heap = [prio[g] for g in nodes if not indeg[g]]
    heapq.heapify(heap)
    popped: list[int] = []
    left_out: set[int] = set()
    pop, push, pushpop, append = heapq.heappop, heapq.heappush, heapq.heappushpop, popped.append
    # The first child made available is held back and offered with the next pop: one
    # heappushpop (which returns it untouched when it is the best) instead of push + pop.
    held = -1
    while heap or held >= 0:
        if held < 0:
            g = by_prio[pop(heap)]
        else:
            g = by_prio[pushpop(heap, held)]
            held = -1
        append(g)
        start, stop = offsets[g], offsets[g + 1]
        if start == stop:
            continue
        kids = tails[start:stop]
        if bad and (g in bad or g in left_out):
            left_out.add(g)
            left_out.update(kids)
        for child in kids:
            remaining = indeg[child] - 1
            indeg[child] = remaining
            if not remaining:
                if held < 0:
                    held = prio[child]
                else:
                    push(heap, prio[child])
    if bad:
        left_out.update(bad.intersection(popped))
    return popped, left_out


def _merge_cycles(
    cat: Catalogue,
    graph: _Graph,
    first_pass: tuple[list[int], set[int], set[int], set[int]],
    indeg: list[int],
    bad: set[int],
) -> Order:
    """Order a platform whose graph has cycles, reusing the first pass.

    Each strongly connected component of the stuck nodes becomes one unit, represented by
    its highest-priority member (so it ranks where that member would). Nodes off the cycles
    keep their first-pass order, since nothing stuck lies beneath them; the units are merged
    in exactly where a heap-ordered pass over the condensed graph would pop them. ``feeds``
    are the nodes off the cycles with a stuck child.
    """
    popped, left_out, stuck, feeds = first_pass
    merge = _CycleMerge(cat, graph, left_out)
    merge.condense(stuck, indeg, bad)
    merge.walk(popped, feeds)
    return merge.result


class _CycleMerge:
    """The state of one `_merge_cycles`: the condensed units and the heap of ready ones.

    ``rep`` maps each stuck node to its unit (the unit's highest-priority member);
    ``members_of`` a unit to its members in priority order; ``pending`` a unit to its
    incoming edges not yet released; ``heap`` holds the priorities of the units with none
    pending. ``left_out`` is the first pass's set, extended in place.
    """

    def __init__(self, cat: Catalogue, graph: _Graph, left_out: set[int]) -> None:
        self.prio, self.by_prio, self.graph, self.left_out = cat.prio, cat.by_prio, graph, left_out
        self.rep: dict[int, int] = {}
        self.members_of: dict[int, tuple[int, ...]] = {}
        self.pending: dict[int, int] = {}
        self.heap: list[int] = []
        self.result = Order()

    def condense(self, stuck: set[int], indeg: list[int], bad: set[int]) -> None:
        """Make each strongly connected component of ``stuck`` one unit; fill the heap."""
        prio, rep, pending, left_out = self.prio, self.rep, self.pending, self.left_out
        for component in _strongly_connected(stuck, self.graph):
            if len(component) == 1:  # stuck only because it rests on a cycle
                g = component[0]
                self.members_of[g], rep[g], pending[g] = (g,), g, indeg[g]
                if g in bad:
                    left_out.add(g)
                continue
            unit = tuple(sorted(component, key=prio.__getitem__))
            self.members_of[unit[0]] = unit
            rep.update(dict.fromkeys(unit, unit[0]))
            inside = sum(rep.get(c) == unit[0] for m in unit for c in self.graph.children(m))
            pending[unit[0]] = sum(map(indeg.__getitem__, unit)) - inside
            if bad.intersection(unit):
                left_out.add(unit[0])
        # Units with nothing pending: cycles resting on nothing stuck.
        self.heap = [prio[unit] for unit, count in pending.items() if not count]
        heapq.heapify(self.heap)

    def release(self, node: int, members: tuple[int, ...]) -> None:
        """Release the edges out of ``node`` (a unit or a first-pass node) into other units."""
        rep, pending, left_out = self.rep, self.pending, self.left_out
        for member in members:
            for child in self.graph.children(member):
                target = rep.get(child)
                if target is None or target == node:
                    continue
                if node in left_out:
                    left_out.add(target)
                pending[target] -= 1
                if not pending[target]:
                    heapq.heappush(self.heap, self.prio[target])

    def pop_units_before(self, limit: int) -> None:
        """Emit every ready unit ranked before priority ``limit``, and those they free."""
        heap, result = self.heap, self.result
        while heap and heap[0] < limit:
            unit = self.by_prio[heapq.heappop(heap)]
            members = self.members_of[unit]
            if unit not in self.left_out:
                if len(members) > 1:
                    start = len(result.ids)
                    result.spans.append((start, start + len(members)))
                result.ids.extend(members)
            self.release(unit, members)

    def emit(self, segment: Sequence[int]) -> None:
        """Append first-pass nodes ``segment`` to the result, less those left out."""
        if self.left_out:
            self.result.ids.extend(itertools.filterfalse(self.left_out.__contains__, segment))
        else:
            self.result.ids.extend(segment)

    def walk(self, popped: list[int], feeds: set[int]) -> None:
        """Merge the units into the first pass ``popped``, then append the units left."""
        # Walk the first pass in runs: between feeds nothing new becomes available, and while
        # no unit waits (or the running maximum says when one will go) a run is copied in bulk.
        ranks = list(map(self.prio.__getitem__, popped))
        most = list(itertools.accumulate(ranks, max))
        heap = self.heap
        position = 0
        for feed in [*itertools.compress(itertools.count(), map(feeds.__contains__, popped)), -1]:
            end = feed if feed >= 0 else len(popped)
            while position < end:
                stop = self._run_end(ranks, most, position, end)
                self.emit(popped[position:stop])
                position = stop
                if position < end:
                    self.pop_units_before(ranks[position])
            if feed >= 0:
                if heap and heap[0] < ranks[feed]:
                    self.pop_units_before(ranks[feed])
                self.emit(popped[feed : feed + 1])
                self.release(popped[feed], (popped[feed],))
                position = feed + 1
        self.pop_units_before(len(self.prio))

    def _run_end(self, ranks: list[int], most: list[int], position: int, end: int) -> int:
        # Where the run of first-pass nodes from ``position`` stops: at ``end``, or at the
        # first node that ranks after the best waiting unit.
        heap = self.heap
        if not heap:
            return end
        if not position or most[position - 1] < heap[0]:
            return min(end, bisect.bisect_right(most, heap[0], position))
        stop = position
        while stop < end and ranks[stop] < heap[0]:
            stop += 1
        return stop


def _strongly_connected(nodes: set[int], graph: _Graph) -> list[list[int]]:
    """Tarjan's algorithm on ``nodes``; iterative, so deep stacks miss the recursion limit."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    components: list[list[int]] = []
    for root in sorted(nodes):  # sorted: the same components in the same order every run
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(graph.children(root)))]
        while work:
            node, successors = work[-1]
            for child in successors:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.children(child))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[int] = []
                    while not component or component[-1] != node:
                        component.append(stack.pop())
                        on_stack.discard(component[-1])
                    components.append(component)
    return components
