"""Per-pair gradients of the DP discriminator step computed outside Opacus's hooks: `--grad-sample-mode fused`, `vmap`.

The DP discriminator step clips the gradient of each pair's loss, softplus(-D(real i)) + softplus(D(fake i))
(docs/DESIGN.md, "Privacy"). Opacus's hooks modes get it by running the reals and the fakes through the wrapped
discriminator separately and adding the two per-sample gradients per layer, in freshly allocated tensors each
step. These modes compute the same per-pair gradients and hand them to Opacus's DP optimizer as `p.grad_sample`
(Opacus's "no_op" wrapper), which clips, sums, adds the noise and takes the accountant step exactly as in the
other modes, in float32:

- `fused`: one forward pass of the 2n images (reals then fakes) with each layer's input and output captured, one
  backward pass to the layers' outputs only (no weight gradients, no gradient of the images), then per layer the
  pair's weight gradient as ONE batched matrix product: the output gradients of real i and fake i side by side
  (C_out x 2T) times their input patches stacked (2T x C_in k k). The patches are a strided view of the padded input
  copied once, and every large per-step tensor lives in a buffer kept across steps: a fresh 67 MB tensor per step
  costs about as much in page faults as the product itself (benchmarks/results/dp_step-*.md). Conv2d (groups 1,
  zero padding) and Linear layers; anything else with parameters is refused when the discriminator is wrapped.
- `vmap`: torch.func's `vmap(grad(pair loss))` over the module that holds all of D's parameters (`models.
  Discriminator.net`), fed the inputs D's forward builds for it (captured once per step, before any parameter is
  used): the discriminator's own forward is not vmap-able (`F.one_hot` checks its input's values).

Either way one per-pair gradient per parameter, shape (n, *p.shape), for this process's n pairs.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from utils.run.cli import UserError

PAIR_GRADIENT_MODES = ("fused", "vmap")
BUFFER_GROWTH = 1.25  # a buffer outgrown by a larger Poisson batch is reallocated this much larger than needed


def pair_losses(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Each pair's loss; their mean is `utils.gan.steps.d_loss` of the two batches."""
    return F.softplus(-real_logits) + F.softplus(fake_logits)


def parametrized_layers(D: nn.Module) -> list:
    """The modules that own D's trainable parameters directly, in `D.parameters()` order."""
    return [m for m in D.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


class _Buffers:
    """Tensors kept across steps, one per name, grown (never shrunk) to the largest leading size asked for."""

    def __init__(self):
        self.tensors = {}

    def get(self, name: str, n: int, shape: tuple, like: torch.Tensor, zeros: bool = False) -> torch.Tensor:
        """The first n of buffer `name` (shape (n, *shape), like's dtype and device); with `zeros`, zeroed when
        allocated: what the caller never writes stays 0."""
        held = self.tensors.get(name)
        if held is None or len(held) < n or held.shape[1:] != shape or held.device != like.device:
            size = (math.ceil(n * BUFFER_GROWTH), *shape)
            held = like.new_zeros(size) if zeros else like.new_empty(size)
            self.tensors[name] = held
        return held[:n]


# ---------------------------------------------------------------- fused: one forward, one backward, a product a layer

def check_fusable(D: nn.Module):
    """Refuse a layer the fused per-pair gradients do not handle, before anything is trained (one line)."""
    for module in parametrized_layers(D):
        if isinstance(module, nn.Linear):
            continue
        if not isinstance(module, nn.Conv2d):
            raise UserError(f"--grad-sample-mode fused handles Conv2d and Linear layers, not {type(module).__name__}:"
                            " use --grad-sample-mode hooks")
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise UserError(f"--grad-sample-mode fused handles Conv2d with groups 1 and numeric zero padding, not "
                            f"{module}: use --grad-sample-mode hooks")


class FusedPairGradients:
    """`--grad-sample-mode fused` (module docstring): per-pair gradients from one forward and one backward pass."""

    def __init__(self, D: nn.Module):
        check_fusable(D)
        self.buffers = _Buffers()

    def __call__(self, D: nn.Module, real, real_labels, fake, fake_labels) -> tuple:
        """(mean pair loss, {parameter: its per-pair gradients}) for the n pairs (real i, fake i)."""
        n = len(real)
        layers = parametrized_layers(D)
        captured = {}

        def capture(module, inputs, output):
            captured[module] = (inputs[0].detach(), output)
        handles = [layer.register_forward_hook(capture) for layer in layers]
        try:
            logits = D(torch.cat([real, fake]), torch.cat([real_labels, fake_labels]))
        finally:
            for handle in handles:
                handle.remove()
        losses = pair_losses(logits[:n], logits[n:])
        output_grads = torch.autograd.grad(losses.sum(), [captured[layer][1] for layer in layers])
        grads = {}
        for index, (layer, output_grad) in enumerate(zip(layers, output_grads)):
            grads.update(self.layer_grads(f"{index}", layer, captured[layer][0], output_grad.detach(), n))
        return losses.detach().mean(), grads

    def layer_grads(self, name: str, layer: nn.Module, x, output_grad, n: int) -> dict:
        if isinstance(layer, nn.Conv2d):
            weight, bias = self.conv_grads(name, layer, x, output_grad, n)
        else:
            weight, bias = self.linear_grads(name, layer, x, output_grad, n)
        grads = {layer.weight: weight.view(n, *layer.weight.shape)}
        if layer.bias is not None:
            grads[layer.bias] = bias
        return {p: g for p, g in grads.items() if p.requires_grad}

    def conv_grads(self, name: str, conv: nn.Conv2d, x, output_grad, n: int) -> tuple:
        """Pair i's weight gradient: [out grad of real i | of fake i] (C_out x 2T) @ [patches of both] (2T x K)."""
        c_out, h_out, w_out = output_grad.shape[1:]
        t = h_out * w_out
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
        c_in = x.shape[1]
        if ph or pw:  # zero padding: a zero-bordered buffer kept across steps, its interior overwritten
            padded = self.buffers.get(f"{name}.padded", 2 * n, (c_in, x.shape[2] + 2 * ph, x.shape[3] + 2 * pw), x,
                                      zeros=True)
            padded[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]].copy_(x)
            x = padded
        s_n, s_c, s_h, s_w = x.stride()
        patches = x.as_strided((n, 2, h_out, w_out, c_in, kh, kw),  # [pair i, real/fake, position, C_in, kh, kw]
                               (s_n, n * s_n, sh * s_h, sw * s_w, s_c, dh * s_h, dw * s_w), x.storage_offset())
        stacked = self.buffers.get(f"{name}.patches", n, (2 * t, c_in * kh * kw), x)
        stacked.view(n, 2, h_out, w_out, c_in, kh, kw).copy_(patches)
        side_by_side = self.buffers.get(f"{name}.out_grad", n, (c_out, 2 * t), x)
        side_by_side.view(n, c_out, 2, t).copy_(output_grad.reshape(2, n, c_out, t).permute(1, 2, 0, 3))
        weight = torch.bmm(side_by_side, stacked, out=self.buffers.get(f"{name}.weight", n, (c_out, c_in * kh * kw), x))
        return weight, side_by_side.sum(dim=2)

    def linear_grads(self, name: str, linear: nn.Linear, x, output_grad, n: int) -> tuple:
        """Pair i's weight gradient: its 2 x (extra dims) output gradients, transposed, times its inputs."""
        xs = x.reshape(2, n, -1, linear.in_features).transpose(0, 1).reshape(n, -1, linear.in_features)
        gs = output_grad.reshape(2, n, -1, linear.out_features).transpose(0, 1).reshape(n, -1, linear.out_features)
        weight = torch.bmm(gs.transpose(1, 2), xs,
                           out=self.buffers.get(f"{name}.weight", n, (linear.out_features, linear.in_features), x))
        return weight, gs.sum(dim=1)


# ---------------------------------------------------------------- vmap: torch.func over the parameters' module

class _Captured(Exception):
    """Stops D's forward once the input of its parameter-holding module is known."""


def parameter_holder(D: nn.Module) -> nn.Module:
    """The deepest submodule that holds every trainable parameter of D (D itself if none does)."""
    module = D
    while True:
        total = sum(1 for p in module.parameters() if p.requires_grad)
        inner = [child for child in module.children() if sum(1 for p in child.parameters() if p.requires_grad) == total]
        if not inner or total == 0:
            return module
        module = inner[0]


def holder_inputs(D: nn.Module, holder: nn.Module, images, labels) -> torch.Tensor:
    """What D's forward feeds its parameter-holding module for these images and labels (no parameter is used)."""
    if holder is D:
        raise UserError("--grad-sample-mode vmap needs the discriminator's parameters in one submodule (as "
                        "models.Discriminator's `net`): use --grad-sample-mode fused or hooks")
    found = {}

    def grab(module, inputs):
        found["x"] = inputs[0]
        raise _Captured
    handle = holder.register_forward_pre_hook(grab)
    try:
        D(images, labels)
    except _Captured:
        pass
    finally:
        handle.remove()
    return found["x"].detach()


class VmapPairGradients:
    """`--grad-sample-mode vmap` (module docstring): torch.func per-pair gradients."""

    def __init__(self, D: nn.Module):
        self.holder = parameter_holder(D)
        if self.holder is D:
            holder_inputs(D, D, None, None)  # the one-line refusal

    def __call__(self, D: nn.Module, real, real_labels, fake, fake_labels) -> tuple:
        from torch.func import functional_call, grad, vmap
        holder = self.holder
        names = [name for name, p in holder.named_parameters() if p.requires_grad]
        params = {name: p.detach() for name, p in holder.named_parameters() if p.requires_grad}
        x_real = holder_inputs(D, holder, real, real_labels)
        x_fake = holder_inputs(D, holder, fake, fake_labels)

        def pair_loss(weights, x_r, x_f):
            logits = functional_call(holder, weights, (torch.stack([x_r, x_f]),)).flatten()
            loss = pair_losses(logits[0], logits[1])
            return loss, loss

        per_pair, losses = vmap(grad(pair_loss, has_aux=True), in_dims=(None, 0, 0))(params, x_real, x_fake)
        parameters = dict(holder.named_parameters())
        return losses.mean(), {parameters[name]: per_pair[name] for name in names}


def pair_gradients(mode: str, D: nn.Module):
    """The per-pair gradient computer of a mode of PAIR_GRADIENT_MODES, its layers checked on D."""
    return {"fused": FusedPairGradients, "vmap": VmapPairGradients}[mode](D)
