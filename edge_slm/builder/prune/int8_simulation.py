"""Dynamic int8 simulated in torch, so that distillation can learn the rounding the bundle will do.

An int8 encoder bundle (`builder/encoder/precision.py`, onnxruntime's `quantize_dynamic`) rounds
every MatMul's weights to int8 with one scale per output channel (symmetric) and its input, on
each call, to uint8 with one scale and zero point for the whole tensor (`DynamicQuantizeLinear`:
the range always includes 0). `simulated_int8` makes every `nn.Linear` of a torch model do the
same rounding in its forward pass, with straight-through gradients (the rounding is treated as
the identity going back, as in quantization-aware training), and undoes it on exit.

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


def fake_quantize_weight(weight):
    """Symmetric int8 with one scale per output channel (a row of `nn.Linear.weight`), dequantized."""
    import torch

    scale = torch.clamp(weight.detach().abs().amax(dim=1, keepdim=True), min=1e-8) / 127
    rounded = torch.clamp(torch.round(weight / scale), -127, 127) * scale
    return weight + (rounded - weight).detach()


@contextmanager
def simulated_int8(model):
    """Inside, every `nn.Linear` of `model` computes as the dynamic int8 bundle's MatMuls do.
    The rounding itself runs in float32 under any autocast; the product then follows the autocast."""
    import torch

    def rounded_forward(linear):
        def forward(x):
            with torch.autocast(x.device.type, enabled=False):
                inputs = fake_quantize_activation(x.float())
                weight = fake_quantize_weight(linear.weight.float())
            return torch.nn.functional.linear(inputs, weight, linear.bias)

        return forward

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    before = [vars(linear).get("forward") for linear in linears]  # inside another simulation: already rounded
    for linear, forward in zip(linears, before):
        if forward is None:
            linear.forward = rounded_forward(linear)
    try:
        yield len(linears)
    finally:
        for linear, forward in zip(linears, before):
            if forward is None:
                del linear.forward  # the class's forward again
