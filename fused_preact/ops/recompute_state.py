"""The op's per-thread modes that unit/segment recompute sets
(fused_preact.recompute): a StatsTape that records each layer's
normalisation statistics in a block's first run and hands them back in its
second, and keep_activations, under which the op keeps relu(bn(x)) for a
backward that runs right away."""
import contextlib
import threading
from typing import Optional

from torch import Tensor

_state = threading.local()


class StatsTape:
    """The (mean, invstd, scale, shift) of every normalization_stats call of a
    run, and the seed of every dropout mask, in call order: `recording()`
    appends them, `replaying()` hands them back in the same order instead of
    computing them. A unit/segment recompute's second run thus normalises
    with exactly the first run's statistics, makes no statistics pass over
    its layers' inputs (4 per-channel vectors per layer kept, against a pass
    over each layer's input) and drops the same elements.

    A call is named by its layer: ("stats" or "seed", its input's shape, its
    BatchNorm weight's id). A tape recording inside another (a recompute
    nested in a recomputed block: the inner one records during the outer
    one's replay) takes each call's tensors from the enclosing tape, so both
    stay in step."""

    SIZES = {"stats": 4, "seed": 1}  # tensors per call of each kind

    def __init__(self, tensors=(), layers=()):
        self.tensors: list[Tensor] = list(tensors)  # SIZES[kind] per call
        self.layers: list[tuple] = list(layers)  # per call: which layer made it
        self.replay = False
        self._next = self._offset = 0
        self._enclosing: Optional["StatsTape"] = None

    @contextlib.contextmanager
    def recording(self):
        with self._installed(replay=False):
            yield self

    @contextlib.contextmanager
    def replaying(self):
        self._next = self._offset = 0
        with self._installed(replay=True):
            yield self
        if self._next != len(self.layers):
            raise RuntimeError(f"StatsTape: the replayed run normalised {self._next} layers, the recorded one "
                               f"{len(self.layers)}: a recomputed block must run the same layers again")

    @contextlib.contextmanager
    def _installed(self, replay: bool):
        previous = getattr(_state, "tape", None)
        self.replay, self._enclosing, _state.tape = replay, previous, self
        try:
            yield
        finally:
            _state.tape = previous

    def stats(self, layer: tuple, compute) -> tuple[Tensor, ...]:
        """The tensors of this call of `layer` (("stats" or "seed", shape,
        weight id)): replaying, the next recorded ones (which `layer` must
        have made); recording, the enclosing tape's (if any) or compute()'s,
        recorded."""
        if self.replay:
            return self._take(layer)
        result = compute() if self._enclosing is None else self._enclosing.stats(layer, compute)
        self.tensors += result
        self.layers.append(layer)
        return result

    def _take(self, layer: tuple) -> tuple[Tensor, ...]:
        i = self._next
        recorded = self.layers[i] if i < len(self.layers) else None
        if recorded != layer:
            what = ("the recorded run has no such layer" if recorded is None else
                    f"it is a {layer[0]} call where the recorded run made a {recorded[0]} call"
                    if recorded[0] != layer[0] else
                    f"its input shape {layer[1]} is not the recorded {recorded[1]}" if recorded[1] != layer[1] else
                    f"its BatchNorm is not the recorded run's (same input shape {layer[1]})")
            raise RuntimeError(f"StatsTape: layer {i} of the replayed run differs from the recorded run's: {what}; "
                               f"a recomputed block must run the same layers again")
        size = self.SIZES[layer[0]]
        self._next, self._offset = i + 1, self._offset + size
        return tuple(self.tensors[self._offset - size:self._offset])


def current_tape() -> Optional[StatsTape]:
    return getattr(_state, "tape", None)


def replaying_stats() -> bool:
    """Whether normalization_stats hands back recorded statistics now (a recompute's second run)."""
    tape = getattr(_state, "tape", None)
    return tape is not None and tape.replay


def keeping_activations() -> bool:
    return getattr(_state, "keep", False)


@contextlib.contextmanager
def keep_activations():
    """Inside (eager mode), the op keeps relu(bn(x)) for backward where its
    backend materialises it anyway, instead of recomputing it there. For
    recomputations that run inside backward (unit/segment recompute), where
    what is kept lives only until that block's backward returns: one pass
    less per layer, no lasting memory."""
    previous = keeping_activations()
    _state.keep = True
    try:
        yield
    finally:
        _state.keep = previous
