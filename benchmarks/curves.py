"""The paper's speed-up measures on eval curves, as pure functions of ``[(step, score), ...]``.

A curve is a list of ``(optimizer step, score)`` points in increasing step order, where the step counts
every optimizer step of the arm (VPGTrans: warm-up steps included). Definitions (VPGTrans, §4):

- ``steps_to_best(curve)``: the first step at which a curve reaches its maximum.
- ``first_step_reaching(curve, threshold, strict)``: the first step whose score is >= (or, strictly, >)
  ``threshold``; ``None`` if it never does.
- ``speedup(scratch, vpgtrans)``: steps for scratch to reach its best / steps for VPGTrans to *exceed*
  that best; ``None`` when VPGTrans never exceeds it within its budget.
- ``threshold_speedup(scratch, vpgtrans, fraction)``: on smoothed curves, steps for each arm to reach
  ``fraction`` of scratch's smoothed best, scratch's / VPGTrans's — a noisy plateau maximum does not decide it.
"""

from __future__ import annotations

Curve = list[tuple[int, float]]


def smooth(curve: Curve, window: int = 3) -> Curve:
    """Trailing moving average over the last ``window`` points (fewer at the start), so a smoothed value
    at a step only uses evaluations made by then."""
    if window < 1:
        raise ValueError(f"window must be >= 1 (got {window})")
    out = []
    for i, (step, _) in enumerate(curve):
        values = [score for _, score in curve[max(0, i - window + 1): i + 1]]
        out.append((step, sum(values) / len(values)))
    return out


def best(curve: Curve) -> float:
    return max(score for _, score in curve)


def steps_to_best(curve: Curve) -> int:
    top = best(curve)
    return next(step for step, score in curve if score == top)


def first_step_reaching(curve: Curve, threshold: float, strict: bool = False) -> int | None:
    for step, score in curve:
        if score > threshold or (not strict and score >= threshold):
            return step
    return None


def speedup(scratch: Curve, vpgtrans: Curve) -> dict:
    """The paper's measure: scratch's steps to its best / VPGTrans's steps to exceed that best."""
    target = best(scratch)
    scratch_steps = steps_to_best(scratch)
    vpgtrans_steps = first_step_reaching(vpgtrans, target, strict=True)
    return {"scratch_best": target, "scratch_steps": scratch_steps, "vpgtrans_steps": vpgtrans_steps,
            "speedup": _ratio(scratch_steps, vpgtrans_steps)}


def threshold_speedup(scratch: Curve, vpgtrans: Curve, fraction: float, window: int = 3) -> dict:
    """Steps to reach ``fraction`` x scratch's smoothed best, on smoothed curves: scratch's / VPGTrans's."""
    smooth_scratch, smooth_vpgtrans = smooth(scratch, window), smooth(vpgtrans, window)
    threshold = fraction * best(smooth_scratch)
    scratch_steps = first_step_reaching(smooth_scratch, threshold)
    vpgtrans_steps = first_step_reaching(smooth_vpgtrans, threshold)
    return {"fraction": fraction, "threshold": threshold, "scratch_steps": scratch_steps,
            "vpgtrans_steps": vpgtrans_steps, "speedup": _ratio(scratch_steps, vpgtrans_steps)}


def _ratio(numerator: int | None, denominator: int | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    return numerator / max(denominator, 1)  # a step-0 evaluation counts as one step, never a division by zero
