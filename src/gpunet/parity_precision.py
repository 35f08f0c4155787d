"""`gpunet parity --precision bf16|fp16` (gpunet.parity.compare's precision): each row held to
gpunet.parity_bound.precision_bound, the first row over it, how the mixed side scaled its loss (fp16: as
gn.fit does, gpunet.training.loss_scale; the steps its scaler skipped), and the report's text.
"""
from __future__ import annotations

from gpunet.layers import Model
from gpunet.parity_bound import product_bound
from gpunet.training import loss_scale


def precision_rows(model, inputs, fp32: float, unit: float, activations, grads, loss_diff, layers) -> dict:
    """precision_bound per row and for the step, the first row over its bound (steps in order; in a step
    the layers in order, then the loss), and the gradients over the step's bound (kinks: not a verdict).

    The gradients are reported, not held to it: a ReLU (or max pool) whose input lies within the forward's
    difference of its kink passes the gradient on one side and not on the other, a difference of the
    element's whole upstream gradient that no rounding bound covers (at the recipes' tiny batches one
    such element moves a weight gradient's row by up to its size)."""
    if isinstance(model, Model):
        shapes = tuple(a.shape for a in inputs) if isinstance(inputs, list) else inputs.shape
        bound = fp32 + product_bound([model], shapes, unit)
        row_bounds = [bound] * len(layers)
    else:
        bound = fp32 + product_bound(model.layers, inputs.shape, unit)
        row_bounds = [fp32 + product_bound(model.layers, inputs.shape, unit, upto=i + 1) for i in range(len(layers))]
    first_over = None
    for step, (acts, step_grads, loss) in enumerate(zip(activations, grads, loss_diff), 1):
        over = [(f"layer {row}", diff, b) for row, diff, b in zip(layers, acts, row_bounds) if diff > b]
        over += [("loss", loss, bound)] if loss > bound else []
        if over and first_over is None:
            first_over = {"step": step, "where": over[0][0], "diff": over[0][1], "bound": over[0][2]}
    gradients_over = [[step, k, diff] for step, step_grads in enumerate(grads, 1)
                      for k, diff in (step_grads or {}).items() if diff > bound]
    return {"bound": bound, "row_bounds": row_bounds, "first_over": first_over, "gradients_over": gradients_over}


def loss_scaling(precision: str, init_scale: float | None, overflows: list) -> str:
    """How the mixed side scaled its loss, as training does (the report's loss_scale)."""
    if precision != "fp16":
        return f"none in {precision}, as in training (float32's exponent range: nothing to overflow)"
    start = loss_scale.INIT_SCALE if init_scale is None else init_scale
    return (f"fp16's dynamic loss scale, gn.fit's (from {start:g}, halved and the step skipped when a gradient "
            f"overflows, doubled after {loss_scale.GROWTH_INTERVAL} clean steps): {len(overflows)} "
            f"overflow{'' if len(overflows) == 1 else 's'}")


def format_precision(report: dict) -> str:
    """A bf16/fp16 report: per row the largest difference from fp32 and its bound, per step the largest
    differences, the first row over its bound, and the loss scaling."""
    p, device, bound = report["precision"], report["devices"][0], report["bound"]
    dropout = "" if report.get("dropout") is None else f", dropout {report['dropout']}"
    lines = [f"parity of {report['model']}: fp32 vs {p} on {device}, {len(report['losses'])} steps{dropout}, in "
             f"lockstep (largest relative difference over all steps, and its bound)", "",
             f"{'node' if report.get('graph') else 'layer'} activations:"]
    lines += [f"  {name:<60} {diff:.2e}  {b:.2e}"
              for name, diff, b in zip(report["layers"], report["activation_diff"], report["row_bounds"])]
    compared = any(d is not None for d in report["step_grad_diff"])
    lines += ["", "parameter gradients:" if compared else "parameter gradients: none compared (every step overflowed)"]
    lines += [f"  {name:<60} {diff:.2e}  {bound:.2e}" for name, diff in report["grad_diff"].items()]
    lines += ["", f"{'step':>5}  {'loss in fp32':>14}  {'loss in ' + p:>14}  {'loss diff':>10}  "
                  f"{'activations':>11}  {'gradients':>10}   (relative differences)"]
    rows = zip(report["losses"], report["loss_diff"], report["step_activation_diff"], report["step_grad_diff"])
    for step, ((x, y), loss, act, grad) in enumerate(rows, 1):
        grad = "skipped" if grad is None else f"{grad:.2e}"  # (an overflow: the step's update skipped)
        lines.append(f"{step:>5}  {x:>14.6f}  {y:>14.6f}  {loss:>10.2e}  {act:>11.2e}  {grad:>10}")
    over = report["first_over"]
    first = "none" if over is None else (f"step {over['step']}, {over['where']}: {over['diff']:.2e} > "
                                         f"{over['bound']:.2e}")
    kinks = ", ".join(f"{k} at step {step} ({diff:.2e})" for step, k, diff in report["gradients_over"]) or "none"
    lines += ["", f"bound on one step's differences from fp32: {bound:.2e} (the loss, gradients; a layer's: its row; "
                  f"gpunet.parity_bound.precision_bound)", f"first layer or loss over its bound: {first}",
              f"gradients over it (a ReLU's or max pool's kink within the forward's difference switches the "
              f"gradient; reported, not a verdict): {kinks}",
              f"loss scaling: {report['loss_scale']}"]
    lines += [f"  overflow at step {o['step']}: loss scale {o['scale_before']:g} -> {o['scale_after']:g}, the step's "
              f"update skipped in fp32 and {p} alike (its gradients not compared)" for o in report["overflows"]]
    return "\n".join(lines)
