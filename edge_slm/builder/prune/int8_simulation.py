"""Dynamic int8 simulated in torch, so that distillation can learn the rounding the bundle will do.

An int8 encoder bundle (`builder/encoder/precision.py`, onnxruntime's `quantize_dynamic`) rounds
every MatMul's weights to int8 with one scale per output channel (symmetric; -64..64 with the
profile's `reduce_range`, "7-bit") and its input, on each call, to uint8 with one scale and zero
point for the whole tensor (`DynamicQuantizeLinear`: the range always includes 0).
`simulated_int8` makes every `nn.Linear` of a torch model do the same rounding in its forward
pass, with straight-through gradients (the rounding is treated as the identity going back, as in
quantization-aware training), and undoes it on exit.

Written here rather than with torch.ao's fake-quantize modules: those observe ranges over many
batches (static quantization) or need the model converted; onnxruntime's dynamic scheme takes
each call's own range, which is two lines of arithmetic.
"""

from __future__ import annotations

from contextlib import contextmanager


def fake_quantize_activation(x):
    """`DynamicQuantizeLinear` then dequantized: uint8, one scale and zero point per tensor."""
    import torch

    low = torch.clamp(x.detach().min(), max=0.0)
    high = torch.clamp(x.detach().max(), min=0.0)
    scale = torch.clamp(high - low, min=1e-8) / 255
    zero_point = torch.round(-low / scale)
    rounded = (torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point) * scale
    return x + (rounded - x).detach()


def fake_quantize_weight(weight, *, reduce_range: bool):
    """Symmetric int8 with one scale per output channel (a row of `nn.Linear.weight`), dequantized;
    with `reduce_range`, 7-bit as onnxruntime's `quantize_dynamic(reduce_range=True)` makes them."""
    import torch

    levels = 64 if reduce_range else 127
    scale = torch.clamp(weight.detach().abs().amax(dim=1, keepdim=True), min=1e-8) / levels
    rounded = torch.clamp(torch.round(weight / scale), -levels, levels) * scale
    return weight + (rounded - weight).detach()


@contextmanager
def simulated_int8(model, *, reduce_range: bool):
    """Inside, every `nn.Linear` of `model` computes as the dynamic int8 bundle's MatMuls do (7-bit
    weights with `reduce_range`, as the profile's [encoder] table builds them); yields
    how many it rounds. A layer already rounded (an enclosing simulation) is left to it, and one
    whose forward something else replaced is refused rather than silently skipped.

    The rounding runs in float32 under any autocast. The product of the rounded values then follows
    the autocast: under bfloat16 (distillation's, where the CPU has it) it is rounded again to bf16's
    8 significant bits, about half an int8 step: an approximation of the bundle's arithmetic. It
    was measured as good as the float32 product for distillation (300 steps from the same student:
    simulated-int8 cosine 0.9508 both ways) at two thirds of the time per step."""
    import torch

    def rounded_forward(linear):
        def forward(x):
            with torch.autocast(x.device.type, enabled=False):
                inputs = fake_quantize_activation(x.float())
                weight = fake_quantize_weight(linear.weight.float(), reduce_range=reduce_range)
            return torch.nn.functional.linear(inputs, weight, linear.bias)

        forward.simulates_int8 = True
        return forward

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    replaced = [m for m in linears if "forward" in vars(m) and not getattr(vars(m)["forward"], "simulates_int8", False)]
    if replaced:
        raise RuntimeError(f"{len(replaced)} linear layer(s) have a forward of their own: cannot simulate int8 in them")
    mine = [m for m in linears if "forward" not in vars(m)]
    for linear in mine:
        linear.forward = rounded_forward(linear)
    try:
        yield len(linears)
    finally:
        for linear in mine:
            del linear.forward  # the class's forward again
