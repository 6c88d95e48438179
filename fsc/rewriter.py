"""The one way passes edit graphs: a small rewriter that counts what it did, so that a
pass's ``modified`` flag is computed from real edits, never assumed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch.fx as fx


@dataclasses.dataclass(slots=True)
class GraphRewriter:
    graph: fx.Graph
    inserts: int = 0
    erases: int = 0
    moves: int = 0

    @property
    def modified(self) -> bool:
        return bool(self.inserts or self.erases or self.moves)

    def stats(self) -> dict[str, int]:
        return {"inserted": self.inserts, "erased": self.erases, "moved": self.moves}

    def move_before(self, node: fx.Node, anchor: fx.Node) -> bool:
        """Place ``node`` just before ``anchor``; a no-op (not counted) if it is there."""
        if node is anchor or node.next is anchor:
            return False
        anchor.prepend(node)
        self.moves += 1
        return True

    def move_after(self, node: fx.Node, anchor: fx.Node) -> bool:
        """Place ``node`` just after ``anchor``; a no-op (not counted) if it is there."""
        if node is anchor or anchor.next is node:
            return False
        anchor.append(node)
        self.moves += 1
        return True

    def move_chain_after(self, nodes: list[fx.Node], anchor: fx.Node) -> int:
        """Place ``nodes`` consecutively, in the given order, right after ``anchor``;
        return how many actually moved."""
        moved = 0
        for node in nodes:
            moved += self.move_after(node, anchor)
            anchor = node
        return moved

    def try_move_chain_after(self, nodes: list[fx.Node], anchor: fx.Node, accept: Callable[[], bool]) -> bool:
        """Like :meth:`move_chain_after`, but if ``accept()`` says no afterwards, put every
        node back where it was (uncounted) and return False."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        home = {node: node.prev for node in nodes}
        moved = self.move_chain_after(nodes, anchor)
        if not moved:
            return False
        if accept():
            return True
        # Restore in original order: each node's old predecessor is back in place by then.
        for node in sorted(nodes, key=order.__getitem__):
            home[node].append(node)
        self.moves -= moved
        return False

    def try_move_after(self, node: fx.Node, anchor: fx.Node, accept: Callable[[], bool]) -> bool:
        """Move ``node`` after ``anchor``, keep the move if ``accept()`` says so, else put
        it back where it was (uncounted)."""
        return self.try_move_chain_after([node], anchor, accept)

    def insert_before(self, anchor: fx.Node, target: Any, args: tuple, kwargs: dict | None = None,
                      meta: dict | None = None) -> fx.Node:
        with self.graph.inserting_before(anchor):
            node = self.graph.call_function(target, args, kwargs or {})
        if meta:
            node.meta.update(meta)
        self.inserts += 1
        return node

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        """Redirect every use of ``old`` to ``new`` and erase ``old``."""
        old.replace_all_uses_with(new)
        self.erase(old)

    def erase(self, node: fx.Node) -> None:
        self.graph.erase_node(node)
        self.erases += 1
