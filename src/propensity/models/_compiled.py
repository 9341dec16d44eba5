"""The one module that imports the tree compiler: LightGBM boosters compiled to native code.

A fitted booster is turned into C by Treelite + TL2cgen and built with the
system's C compiler into a shared library, loaded with ctypes. Chosen over
lleaves (LLVM), the other compiler for LightGBM models, because lleaves 1.3
does not run on the llvmlite this environment pins (0.50 removed the legacy
pass manager it calls), while TL2cgen needs only a C compiler. Measured on a
600-tree, 15-leaf binary model (30 features, 10 % NaN), one thread: LightGBM's
``Booster.predict`` 41 µs a row, the compiled library with quantized
thresholds 12.5 µs, bit-identical raw scores; building it takes about 15 s
with two compiler processes, hence the cache.

The compiled library is cached on disk under a name made of the SHA-256 of
the model's text (the trees actually used) and the compiler's version, so a
restart, a hot reload or a second process loads it instead of compiling
again; a library is written under a temporary name and renamed, so readers
never see half a file. When the compiler is missing or fails,
:func:`compile_trees` returns ``None`` (logged once per process) and callers
keep LightGBM's own predict.

Two more kinds of library come from rewritten model texts
(:mod:`propensity.models._tree_text`): a booster's leaf model
(:func:`compile_leaves`, the reasons' leaves) and a meta-learner's boosters
stacked into one (:func:`compile_stack`, one call for all of them).

Single rows skip TL2cgen's batch predictor (its DMatrix and thread pool cost
tens of microseconds) and call the generated ``predict`` function directly
on a prepared buffer of its ``union Entry`` cells.

Inputs are normalized first, because of how that union marks a missing value
(TL2cgen 1.0): ``union Entry {int missing; double fvalue; ...}`` and the
generated code tests ``data[i].missing != -1``, which reads the low 32 bits
of the double. A present value whose low 32 bits are all ones (such as
``433.49999999999994``, one ulp below ``433.5``: sums of prices give them)
is therefore taken for missing and goes the default way, where LightGBM
compares it (3 of 2,997 customers scored differently on the quickstart
models). :func:`_unaliased` moves such a value by one ulp, in the direction
that leaves every ``value <= threshold`` of that feature unchanged (the
model's thresholds next to such values are tabulated when it is loaded); a
model where no direction is safe is not compiled.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from propensity.models._kernels import mark_row_cells
from propensity.models._tree_text import leaf_text, link, model_text, stacked_text

__all__ = [
    "CompiledTrees",
    "StackedTrees",
    "compile_leaves",
    "compile_model",
    "compile_stack",
    "compile_trees",
]

_log = logging.getLogger(__name__)
_warned: set[str] = set()
_CORES = os.cpu_count() or 1
#: The compiled code's marker of a missing value: ``union Entry.missing == -1`` (the low
#: 32 bits of the 8-byte cell on a little-endian machine), as TL2cgen's own DMatrix writes.
_MISSING = np.int64(0xFFFFFFFF)
#: The low 32 bits that read as ``missing == -1``, viewed as the even uint32 words.
_LOW_WORD = np.uint32(0xFFFFFFFF)
_LOW_BITS = np.int64(0xFFFFFFFF)  # the same, as the low bits of an int64 cell
#: Options of the generated code: thresholds as integer bin indices (fewer float compares).
_PARAMS: dict[str, Any] = {"quantize": 1}


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        _log.warning("%s; scoring with LightGBM's own predict", message)


def _reads_as_missing(values: np.ndarray) -> np.ndarray:
    """Where float64 values (C-contiguous) have the low 32 bits of ``union Entry.missing == -1``."""
    return values.view(np.uint32)[..., 0::2] == _LOW_WORD  # little-endian: low word first


def _unaliased(data: np.ndarray, guarded: frozenset[tuple[int, float]]) -> np.ndarray:
    """``data`` (rows of float64) with every value that would read as missing moved by one ulp.

    A value ``x`` moved to its neighbour ``y`` keeps every ``x <= t`` unless a
    threshold ``t`` of its feature equals ``min(x, y)``; ``guarded`` holds the
    ``(feature, threshold)`` pairs where that can happen, and those values move
    the other way. Towards zero by default, which keeps the integer part a
    categorical split reads. ``data`` itself is returned when nothing moves.

    Examples
    --------
    >>> _unaliased(np.array([[433.49999999999994, 1.0]]), frozenset()).tolist()
    [[433.4999999999999, 1.0]]
    """
    hit = _reads_as_missing(data)
    if not hit.any():
        return data
    data = data.copy()
    where = np.nonzero(hit)
    x = data[where]
    moved = np.nextafter(x, 0.0)
    if guarded:
        away = np.nextafter(x, np.copysign(np.inf, x))
        columns = where[-1].tolist()
        pairs = zip(columns, x.tolist(), moved.tolist(), strict=True)
        for k, (column, value, near) in enumerate(pairs):
            if (column, min(value, near)) in guarded:  # a threshold between the two
                moved[k] = away[k]
    data[where] = moved
    return data


def _guarded_splits(text: str) -> frozenset[tuple[int, float]] | None:
    """The numerical splits of a model's text that :func:`_unaliased` must step around.

    Those whose threshold ``t`` would read as missing, or whose next float
    above would. ``None`` when some feature has both such a ``t`` and the float
    just below it as thresholds: a value equal to ``t`` then has no safe move.
    """
    features: list[str] = []
    thresholds: list[str] = []
    kinds: list[str] = []
    for line in text.splitlines():
        if line.startswith("end of trees"):
            break
        key, _, values = line.partition("=")
        if key == "split_feature":
            features += values.split()
        elif key == "threshold":
            thresholds += values.split()
        elif key == "decision_type":
            kinds += values.split()
    if not (len(features) == len(thresholds) == len(kinds)):
        raise ValueError("cannot read the splits of the model's text")
    numerical = np.array([int(k) & 1 == 0 for k in kinds], dtype=bool)  # bit 0: categorical
    f = np.array(features, dtype=np.int64)[numerical]
    t = np.array(thresholds, dtype=np.float64)[numerical]
    aliased = _reads_as_missing(t)
    near = aliased | _reads_as_missing(np.nextafter(t, np.inf))
    splits = set(zip(f.tolist(), t.tolist(), strict=True))
    below = np.nextafter(t[aliased], -np.inf)
    if any(pair in splits for pair in zip(f[aliased].tolist(), below.tolist(), strict=True)):
        return None
    return frozenset(zip(f[near].tolist(), t[near].tolist(), strict=True))


class CompiledTrees:
    """``Booster.predict`` of a LightGBM model from its compiled library.

    Parameters
    ----------
    library : path
        The shared library built by :func:`compile_trees`.
    n_features : int
        Columns of the float64 rows it predicts.
    guarded : frozenset of (int, float)
        The splits values step around (:func:`_guarded_splits`).
    n_outputs : int
        Values per row: 1 for a prediction, one per tree for the leaf indices
        of :func:`compile_leaves`.

    Examples
    --------
    >>> compiled = compile_trees(booster, None, "data/compiled")  # doctest: +SKIP
    >>> compiled.predict(X, num_threads=1)  # doctest: +SKIP
    array([0.27, 0.61])
    """

    def __init__(
        self,
        library: str | Path,
        n_features: int,
        guarded: frozenset[tuple[int, float]] = frozenset(),
        n_outputs: int = 1,
    ) -> None:
        import tl2cgen

        self._tl2cgen = tl2cgen
        self.library = str(library)
        self.n_features = int(n_features)
        self.guarded = frozenset(guarded)
        self.n_outputs = int(n_outputs)
        self._batch = tl2cgen.Predictor(self.library, nthread=_CORES)
        # void predict(union Entry* data, int pred_margin, double* result): called keeping
        # the GIL (PyDLL), since one row takes microseconds, less than handing it over.
        self._lib = ctypes.PyDLL(self.library)  # mapped as long as this object lives
        self._row_fn = self._lib.predict
        self._row_fn.restype = None
        self._row_fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        self._local = threading.local()

    def _row_buffers(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        state: tuple[np.ndarray, np.ndarray, int, int] | None = getattr(self._local, "row", None)
        if state is None:  # per thread: the generated code overwrites its input cells
            cells = np.empty(self.n_features, dtype=np.int64)
            out = np.empty(self.n_outputs, dtype=np.float64)
            state = self._local.row = (cells, out, cells.ctypes.data, out.ctypes.data)
        return state

    def _single(self) -> Any:
        predictor = getattr(self._local, "single", None)
        if predictor is None:  # one single-threaded predictor per thread: never shared
            predictor = self._local.single = self._tl2cgen.Predictor(self.library, nthread=1)
        return predictor

    def _row(self, row: np.ndarray, raw_score: bool) -> np.ndarray:
        """The outputs of one row, in this thread's buffer (valid until its next call)."""
        values = np.ascontiguousarray(row, dtype=np.float64).reshape(-1)
        if values.size != self.n_features:
            raise ValueError(f"row has {values.size} values; the model expects {self.n_features}")
        cells, out, cells_address, out_address = self._row_buffers()
        if not mark_row_cells(values.view(np.int64), cells, _MISSING, _LOW_BITS):
            values = _unaliased(values, self.guarded)  # rare: a value that reads as missing
            cells[:] = values.view(np.int64)
            cells[np.isnan(values)] = _MISSING
        out.fill(0.0)  # the generated code adds every tree's leaf to it
        self._row_fn(cells_address, int(raw_score), out_address)
        return out

    def predict_row(self, row: np.ndarray, raw_score: bool = False) -> float:
        """The prediction of one row of ``n_features`` float64 values."""
        return float(self._row(row, raw_score)[0])

    def predict(self, X: np.ndarray, num_threads: int = 0, raw_score: bool = False) -> np.ndarray:
        """Prediction of every row, shape ``(n,)``, as ``Booster.predict`` gives it.

        ``raw_score=True`` returns the sum of the trees (the margin); otherwise
        the objective's link is applied (the sigmoid of a binary model).
        ``num_threads=1`` predicts in the calling thread; any other value on
        every core. A model of several outputs returns shape ``(n, n_outputs)``.
        """
        data = np.ascontiguousarray(X, dtype=np.float64)
        if data.ndim != 2 or data.shape[1] != self.n_features:
            raise ValueError(f"X has shape {data.shape}; expected (n, {self.n_features})")
        shape = (len(data),) if self.n_outputs == 1 else (len(data), self.n_outputs)
        if len(data) == 0:
            return np.zeros(shape)
        if len(data) == 1:
            return self._row(data[0], raw_score).copy().reshape(shape)
        predictor = self._single() if num_threads == 1 else self._batch
        matrix = self._tl2cgen.DMatrix(_unaliased(data, self.guarded), missing=np.nan)
        predicted = predictor.predict(matrix, pred_margin=raw_score)
        return np.asarray(predicted, np.float64).reshape(shape)

    def leaves(self, X: np.ndarray, num_threads: int = 0) -> np.ndarray:
        """Leaf index of every row in every tree, ``(n, n_trees)`` (of :func:`compile_leaves`)."""
        out = self.predict(X, num_threads, raw_score=True).reshape(len(X), self.n_outputs)
        return out.astype(np.int64)

    def __reduce__(self) -> tuple[Any, ...]:
        # Handles and thread-locals live in this process; the library file is reloaded.
        return (CompiledTrees, (self.library, self.n_features, self.guarded, self.n_outputs))


def _build(text: str, library: Path) -> None:
    import tl2cgen
    import treelite

    library.parent.mkdir(parents=True, exist_ok=True)
    fd, source = tempfile.mkstemp(suffix=".txt", prefix=f".{library.stem}-", dir=library.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        model = treelite.frontend.load_lightgbm_model(source)  # the parser from_lightgbm uses
    finally:
        os.unlink(source)
    trees = int(model.num_tree)
    # Split big ensembles into translation units compiled in parallel.
    params = {**_PARAMS, "parallel_comp": max(1, min(4 * _CORES, trees // 50))}
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=f".{library.stem}-", dir=library.parent)
    os.close(fd)
    try:
        tl2cgen.export_lib(model, toolchain="gcc", libpath=tmp, params=params, nthread=_CORES)
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def compile_trees(
    booster: Any, num_iteration: int | None, cache_dir: str | Path | None
) -> CompiledTrees | None:
    """The compiled form of a booster's first ``num_iteration`` trees, or ``None``.

    Parameters
    ----------
    booster : lightgbm.Booster
        One tree per iteration (binary or regression objectives).
    num_iteration : int, optional
        Trees to use, as in ``Booster.predict`` (``None``: the best iteration
        if any, else all).
    cache_dir : path, optional
        Folder of compiled libraries, reused across processes; ``None``: a
        folder in the system's temporary directory.

    Returns
    -------
    CompiledTrees or None
        ``None`` when the compiler is unavailable or fails (logged once).
    """
    return _compiled(booster, num_iteration, cache_dir, leaves=False)


def compile_leaves(
    booster: Any, num_iteration: int | None, cache_dir: str | Path | None
) -> CompiledTrees | None:
    """:func:`compile_trees` of the booster's leaf model: each tree answers its leaf index.

    The model text is :func:`~propensity.models._tree_text.leaf_text`'s.

    Its :meth:`CompiledTrees.leaves` equals ``Booster.predict(pred_leaf=True)``.
    """
    return _compiled(booster, num_iteration, cache_dir, leaves=True)


class StackedTrees:
    """Several boosters on the same features compiled into one library (:func:`compile_stack`).

    ``predict(X, num_threads)`` returns shape ``(n, n_boosters)``: column ``k``
    is booster ``k``'s ``Booster.predict`` (its objective's link applied).
    """

    def __init__(self, trees: CompiledTrees, links: Sequence[float | None]) -> None:
        self.trees = trees
        self.links = list(links)  # per booster: the sigmoid's slope, or None (identity)
        self._linked = np.array([link is not None for link in self.links])
        self._slopes = np.array([link or 0.0 for link in self.links])

    def predict(self, X: np.ndarray, num_threads: int = 0) -> np.ndarray:
        raw = self.trees.predict(X, num_threads, raw_score=True).reshape(len(X), -1)
        if self._linked.any():
            linked = raw[:, self._linked]
            raw[:, self._linked] = 1.0 / (1.0 + np.exp(-self._slopes[self._linked] * linked))
        return raw


def compile_stack(boosters: Sequence[Any], cache_dir: str | Path | None) -> StackedTrees | None:
    """One compiled library predicting every booster of a meta-learner.

    The model text is :func:`~propensity.models._tree_text.stacked_text`'s.

    ``None`` (logged once) when the boosters differ in features or kind, or
    compiling fails; callers then compile them one by one.
    """
    texts = [model_text(b, None) for b in boosters]
    features = {int(b.num_feature()) for b in boosters}
    kinds = [link(text) for text in texts]
    if (
        not texts
        or len(features) != 1
        or any(b.num_model_per_iteration() != 1 for b in boosters)
        or not all(ok for ok, _ in kinds)
        or len({tuple(b.feature_name()) for b in boosters}) != 1
    ):
        _warn_once("boosters of different features or objectives are not stacked")
        return None
    trees = _library(stacked_text(texts), features.pop(), len(texts), cache_dir)
    return None if trees is None else StackedTrees(trees, [slope for _, slope in kinds])


def _compiled(
    booster: Any, num_iteration: int | None, cache_dir: str | Path | None, leaves: bool
) -> CompiledTrees | None:
    if booster.num_model_per_iteration() != 1:
        _warn_once("the tree compiler path serves binary and regression boosters only")
        return None
    text = model_text(booster, num_iteration)
    if not leaves:
        return _library(text, int(booster.num_feature()), 1, cache_dir)
    return _library(leaf_text(text), int(booster.num_feature()), text.count("\nTree="), cache_dir)


def _library(
    text: str, n_features: int, n_outputs: int, cache_dir: str | Path | None
) -> CompiledTrees | None:
    """The compiled library of a model text, built once and cached by its content."""
    try:
        import tl2cgen
        import treelite
    except ImportError as exc:
        _warn_once(f"tree compiler unavailable ({exc})")
        return None
    guarded = _guarded_splits(text)
    if guarded is None:
        _warn_once("a model has adjacent thresholds that compiled code would mistake for missing")
        return None
    key = hashlib.sha256(
        f"{treelite.__version__}/{tl2cgen.__version__}/{sorted(_PARAMS.items())}\n{text}".encode()
    ).hexdigest()[:32]
    folder = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    library = folder / "compiled-trees" / f"{key}.so"
    try:
        if not library.exists():
            _build(text, library)
        return CompiledTrees(library, n_features, guarded, n_outputs)
    except Exception as exc:  # a missing gcc, a full disk...: the model still serves
        _warn_once(f"compiling a model failed ({type(exc).__name__}: {exc})")
        return None


def compile_model(model: Any, cache_dir: str | Path | None) -> Any:
    """``model`` with its trees compiled to native code, when it can compile itself.

    Fitted models own their compiled path (``compile(cache_dir)`` of
    :class:`~propensity.models.pipeline.CalibratedBooster`, the uplift learners
    and :class:`~propensity.models.nba.NBAModel`); another object is returned
    as it is. The libraries are cached in ``cache_dir`` by the models' content,
    so a restart or a hot reload of the same version loads them without compiling.

    Examples
    --------
    >>> compile_model(object(), None).__class__.__name__
    'object'
    """
    compile_self = getattr(model, "compile", None)
    return compile_self(cache_dir) if callable(compile_self) else model
