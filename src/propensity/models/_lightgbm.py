"""The one module that calls LightGBM's private C bindings: one-row predictions.

Every use of ``lightgbm.basic._LIB`` / ``_safe_call`` (and the booster's
private class count) lives here, so a LightGBM upgrade that moves them
breaks one file. They are used because a measurement says so:

``Booster.predict`` costs about 40-50 µs for one row even single-threaded:
it validates parameters, builds a predictor and a result buffer on every
call. LightGBM's ``LGBM_BoosterPredictForMatSingleRowFast`` keeps all of
that in a prepared "fast config" and predicts one row in a few
microseconds. ``/score`` makes a dozen such calls (probabilities and
contributions of two models, eight uplift boosters), so this is a large
share of its latency budget.

A fast config is not safe to share between threads: each thread gets its
own, created on first use. The call itself goes through a prototype that
takes plain addresses and keeps the GIL: for a few microseconds of C,
converting ctypes arguments and handing the GIL over and back cost more
than the prediction, and a waiting thread could hold the GIL for a whole
switch interval before handing it back.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any, Literal

import lightgbm as lgb
import numpy as np
from lightgbm.basic import _LIB, _safe_call

__all__ = ["SingleRowPredictor", "Predict", "estimator_predict"]

#: ``fn(X, num_threads) -> (n,)``: a fitted model's prediction on a float64 matrix.
Predict = Callable[[np.ndarray, int], np.ndarray]

# C API predict types.
_PREDICT_TYPES = {"value": 0, "leaf": 2, "contrib": 3}
_DTYPE_FLOAT64 = 1
# int LGBM_BoosterPredictForMatSingleRowFast(config, row, *out_len, *out_result)
_PREDICT_FAST = ctypes.PYFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
)(("LGBM_BoosterPredictForMatSingleRowFast", _LIB))
_FREE_CONFIG = _LIB.LGBM_FastConfigFree


class SingleRowPredictor:
    """Predict one float64 row with a fitted ``lightgbm.Booster``.

    Parameters
    ----------
    booster : lightgbm.Booster
    num_iteration : int, optional
        Trees to use, as ``Booster.predict`` (``None``: the best iteration
        if any, else all).
    output : {"value", "contrib", "leaf"}
        The prediction, its TreeSHAP contributions (``pred_contrib=True``) or
        the leaf index in every tree (``pred_leaf=True``).

    Examples
    --------
    >>> predictor = SingleRowPredictor(booster)  # doctest: +SKIP
    >>> predictor(np.zeros(booster.num_feature()))  # doctest: +SKIP
    array([0.27])
    """

    def __init__(
        self,
        booster: lgb.Booster,
        num_iteration: int | None = None,
        output: Literal["value", "contrib", "leaf"] = "value",
    ):
        self.booster = booster  # keeps the handle alive as long as the configs
        self.ncol = int(booster.num_feature())
        if num_iteration is None:
            num_iteration = int(getattr(booster, "best_iteration", 0) or 0)
        self.num_iteration = max(int(num_iteration), 0) or -1
        self.output = output
        self.predict_type = _PREDICT_TYPES[output]
        # Output length per class (binary/regression: one class): one value,
        # ncol + 1 contributions, or one leaf per tree used.
        n_classes = int(booster._Booster__num_class)  # type: ignore[attr-defined]
        trees = booster.current_iteration()
        if self.num_iteration > 0:
            trees = min(trees, self.num_iteration)
        width = {"value": 1, "contrib": self.ncol + 1, "leaf": trees}[output]
        self.out_len = width * n_classes
        self._free = _FREE_CONFIG  # module globals may be gone when the last predictor dies
        self._local = threading.local()
        self._configs: list[ctypes.c_void_p] = []
        self._lock = threading.Lock()

    def _config(self) -> tuple[int, np.ndarray, int, int]:
        state: tuple[int, np.ndarray, int, int] | None = getattr(self._local, "state", None)
        if state is None:
            handle = ctypes.c_void_p()
            _safe_call(
                _LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
                    self.booster._handle,
                    ctypes.c_int(self.predict_type),
                    ctypes.c_int(0),
                    ctypes.c_int(self.num_iteration),
                    ctypes.c_int(_DTYPE_FLOAT64),
                    ctypes.c_int32(self.ncol),
                    ctypes.c_char_p(b"num_threads=1"),
                    ctypes.byref(handle),
                )
            )
            with self._lock:
                self._configs.append(handle)
            out = np.empty(self.out_len, dtype=np.float64)
            length = np.zeros(1, dtype=np.int64)
            # Addresses of the config, the result buffer and the returned length, which
            # the buffers kept in this state keep valid.
            assert handle.value is not None  # set by a successful init
            state = (handle.value, out, out.ctypes.data, length.ctypes.data)
            self._local.state, self._local.length = state, length
        return state

    def __call__(self, row: np.ndarray) -> np.ndarray:
        """Prediction (shape ``(out_len,)``) of one row of ``ncol`` float64 values."""
        data = np.ascontiguousarray(row, dtype=np.float64)
        if data.size != self.ncol:
            raise ValueError(f"row has {data.size} values; the booster expects {self.ncol}")
        handle, out, out_address, length_address = self._config()
        _safe_call(_PREDICT_FAST(handle, data.ctypes.data, length_address, out_address))
        return out.copy()

    def __del__(self) -> None:
        for handle in getattr(self, "_configs", []):
            self._free(handle)

    def __getstate__(self) -> dict[str, Any]:
        # Fast configs and thread-locals live in this process only; rebuilt on first use.
        return {"booster": self.booster, "num_iteration": self.num_iteration, "output": self.output}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["booster"], state["num_iteration"], state["output"])  # type: ignore[misc]


def estimator_predict(model: Any, compiled: Any = None) -> Predict:
    """``predict_proba[:, 1]`` of a binary LGBMClassifier or ``predict`` of a regressor.

    Straight from the booster on a float64 matrix, with a chosen thread count:
    the scikit-learn wrappers validate and convert on every call (≈ 7 ms for
    one row against ≈ 0.05 ms for ``Booster.predict`` with one thread), and a
    single row takes the C API's fast path. ``compiled`` (a
    :class:`~propensity.models._compiled.CompiledTrees` of the booster)
    predicts instead of LightGBM when given.
    """
    if not isinstance(model, (lgb.LGBMClassifier, lgb.LGBMRegressor)):
        raise TypeError(f"no numpy predict path for a {type(model).__name__}")
    if isinstance(model, lgb.LGBMClassifier) and len(model.classes_) != 2:
        raise TypeError("no numpy predict path for a multi-class outcome model")
    if compiled is not None:
        return lambda X, num_threads: compiled.predict(X, num_threads)
    booster: lgb.Booster = model.booster_
    one_row = SingleRowPredictor(booster)

    def predict(X: np.ndarray, num_threads: int) -> np.ndarray:
        if len(X) == 1 and num_threads == 1:
            return one_row(X[0])
        # For a binary objective Booster.predict already returns P(y=1), as predict_proba[:, 1].
        return np.asarray(booster.predict(X, num_threads=num_threads), dtype=np.float64)

    return predict
