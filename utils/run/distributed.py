"""Data parallelism under `torchrun`: the process group, who writes, this process's part of every global batch,
gradients averaged over the processes, BatchNorm statistics of the global batch, and DP-SGD with noise once per step.

Launched without torchrun (no `WORLD_SIZE` > 1 in the environment) every function here is the identity of the
single-process code: one process, rank 0, the whole batch. Under `torchrun --nproc_per_node=N`:

- **Process group**: `gloo` for CPU tensors, `nccl` for CUDA (one GPU per process: `cuda:LOCAL_RANK`), with a
  timeout on every collective, so a dead peer ends the run with an error instead of a hang (`torchrun` also stops
  the other workers when one exits). `torchrun`'s rendezvous flags make the same code multi-node.
- **Same global batch as one process**: every rank draws the global batch's order, Poisson mask and latent
  vectors from the same seeded generators as a single process would, and keeps its contiguous part
  (`local_part`). The generators' states are therefore identical on every rank, rank 0's checkpoint resumes all of
  them, and N processes compute the single-process update up to the order of float reductions.
- **Gradients**: `average_gradients_before_step` makes an optimizer all-reduce (mean) its gradients before each
  step, as Opacus's `DistributedDPOptimizer` does. We do not use `DistributedDataParallel`: its reducer expects
  one backward per forward of the wrapped module, and a GAN step forwards D for G's loss, G under `no_grad`, and
  backpropagates into chosen inputs only. With equal local batches the mean of the local means is the global mean,
  so the non-private paths need a global batch divisible by the number of processes (`check_divisible`).
- **BatchNorm**: `synchronise_batchnorm` makes every BatchNorm that uses batch statistics (training mode) compute
  them over the global batch, with gradients through the all-reduce; in eval mode, or with frozen statistics, it is
  the ordinary layer. `torch.nn.SyncBatchNorm` would do this on GPUs only, and would replace our BatchNorm subclass.
- **DP-SGD** (`make_private_data_parallel`): Opacus's `DifferentiallyPrivateDistributedDataParallel` and
  `DistributedDPOptimizer`. Each rank clips its own examples' gradients; rank 0 alone adds the Gaussian noise of
  std sigma * C; the sum over ranks is divided by the expected global batch B. The Poisson sample is drawn over the
  whole private split with the single-process q, so the mechanism, the accountant's (sigma, q, steps) and the
  calibrated sigma are those of a single process whatever N.
"""
import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from utils.run.cli import UserError, resolve_device

DEFAULT_TIMEOUT_S = 600.0  # a collective waits this long for a dead or stuck peer before the run fails


@dataclass(frozen=True)
class DistributedSettings:
    """How a process joins the group: the collective timeout and torchrun's environment (os.environ by default)."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    environ: dict = None

    def env(self) -> dict:
        return os.environ if self.environ is None else self.environ


# ---------------------------------------------------------------- the process group

def launched_with_several_processes(environ=None) -> bool:
    """True under torchrun (or any launcher setting its variables) with WORLD_SIZE > 1."""
    environ = os.environ if environ is None else environ
    return int(environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def process_device(device_name: str, local_rank: int) -> torch.device:
    """This process's device: for CUDA, the GPU of its local rank (one GPU per process)."""
    device = resolve_device(device_name)
    if device.type == "mps":
        raise UserError("--device mps cannot run several processes: use --device cpu or cuda under torchrun")
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                        f"use --nproc_per_node at most that")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_name: str, settings: DistributedSettings = DistributedSettings()) -> torch.device:
    """Join torchrun's process group (when launched with several processes) and return this process's device."""
    env = settings.env()
    if not launched_with_several_processes(env):
        return resolve_device(device_name)
    device = process_device(device_name, int(env.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), init_method="env://", rank=int(env["RANK"]),
                                world_size=int(env["WORLD_SIZE"]),
                                timeout=datetime.timedelta(seconds=settings.timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return device


def single_process_device(device_name: str, script: str) -> torch.device:
    """The device of a script that stays in one process (generation and evaluation): refused under torchrun,
    where every copy would write the same run."""
    if launched_with_several_processes():
        raise UserError(f"{script} runs in one process (one device: --device cuda uses a GPU): start it with "
                        f"python, not torchrun")
    return resolve_device(device_name)


def shutdown():
    """Leave the process group (a no-op in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device_name: str, settings: DistributedSettings = DistributedSettings()):
    """`with distributed(args.device) as device:` the process group for the block, left however the block ends
    (an exception in one rank ends that process; torchrun then stops the others)."""
    try:
        yield init_distributed(device_name, settings)
    finally:
        shutdown()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_distributed() -> bool:
    return world_size() > 1


def is_writer() -> bool:
    """Only rank 0 writes run directories, checkpoints, metrics, figures and the ledger."""
    return rank() == 0


def collective_device() -> torch.device:
    """Where a tensor made only for a collective lives: nccl reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier():
    if is_distributed():
        dist.barrier()


def from_writer(obj):
    """Rank 0's value of a picklable object (a run directory's name, ...) on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class NoMetrics:
    """The metrics log of a rank that does not write (every rank computes the same global records)."""

    def append(self, **record):
        pass

    def truncate_after(self, step: int):
        pass


# ---------------------------------------------------------------- this process's part of a global batch

def check_divisible(batch_size: int):
    """The non-private paths average equal local batches: the global batch must split evenly."""
    if batch_size % world_size():
        raise UserError(f"--batch-size {batch_size} must be divisible by the number of processes ({world_size()})")


def shard_bounds(n: int, part: int = None, parts: int = None) -> tuple:
    """[start, stop) of part `part` of `parts` contiguous parts of n items (sizes differ by at most one)."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    size, extra = divmod(n, parts)
    start = part * size + min(part, extra)
    return start, start + size + (part < extra)


def local_part(items):
    """This rank's contiguous part of a global batch (a tensor along dim 0, or a list)."""
    start, stop = shard_bounds(len(items))
    return items[start:stop]


def gather_parts(local: torch.Tensor, n: int) -> torch.Tensor:
    """The whole global batch of n items on every rank, from each rank's contiguous part (`local_part`) in rank
    order: the inverse of `local_part` (the identity in one process). One all_gather, the parts padded to equal
    length."""
    if not is_distributed():
        return local
    bounds = [shard_bounds(n, part) for part in range(world_size())]
    padded = local.new_zeros((max(stop - start for start, stop in bounds), *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in bounds]
    dist.all_gather(parts, padded)
    return torch.cat([part[:stop - start] for part, (start, stop) in zip(parts, bounds)])


class ShardedBatches:
    """This rank's part of every global batch of an `EpochBatches`: same length, same epochs, same resume."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch: int, start: int = 0):
        order = self.batches.order(epoch)
        size = self.batches.batch_size
        for i in range(start, len(self)):
            yield self.batches.split.batch(local_part(order[i * size:(i + 1) * size]))


def global_mean(value: float, weight: float = 1.0) -> float:
    """The weighted mean of a per-rank value over all ranks (a loss over the global batch; the same on every rank,
    so every rank takes the same decisions, e.g. on a non-finite loss)."""
    if not is_distributed():
        return value
    totals = torch.tensor([value * weight, weight], dtype=torch.float64, device=collective_device())
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")


# ---------------------------------------------------------------- models and gradients

@torch.no_grad()
def broadcast_from_writer(module: nn.Module):
    """Rank 0's parameters and buffers on every rank (the same start whatever each rank initialised)."""
    if is_distributed():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, 0)


def all_reduce_mean(tensors: list):
    """Average tensors over the ranks in place, with one collective (flattened)."""
    if not tensors or not is_distributed():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients_before_step(optimizer: torch.optim.Optimizer):
    """Make `optimizer.step()` first average its parameters' gradients over the ranks (a no-op in a single
    process). Every rank must have gradients for the same parameters (the same code path), as with DDP."""
    def hook(opt, args, kwargs):
        all_reduce_mean([p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None])
    return optimizer.register_step_pre_hook(hook) if is_distributed() else None


def data_parallel(models: list, optimizers: list = ()):
    """Under torchrun: rank 0's weights on every rank, BatchNorm statistics of the global batch, and gradients
    averaged before every step of `optimizers` (never a DP optimizer's own: Opacus reduces those, once)."""
    for model in models:
        synchronise_batchnorm(model)
        broadcast_from_writer(model)
    for optimizer in optimizers:
        average_gradients_before_step(optimizer)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: the sum over ranks of the output gradients."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _global_batch_norm(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch normalisation with the mean and (biased) variance of the global batch; running stats updated with the
    unbiased variance, as nn.BatchNorm does. The statistics are float32 (under bf16 autocast the activations
    arrive as bfloat16; the running stats are float32), the output has the input's dtype."""
    dtype, x = x.dtype, x.float()
    dims = [d for d in range(x.dim()) if d != 1]
    count = torch.tensor([float(x.numel() // x.shape[1])], dtype=x.dtype, device=x.device)
    sums = _SumOverRanks.apply(torch.cat([x.sum(dims), count]))
    count = sums[-1]
    mean = sums[:-1] / count
    shape = [1, -1] + [1] * (x.dim() - 2)
    centred = x - mean.view(shape)
    var = _SumOverRanks.apply((centred * centred).sum(dims)) / count
    if norm.track_running_stats and norm.running_mean is not None:
        _update_running_stats(norm, mean.detach(), var.detach() * count / (count - 1).clamp(min=1))
    y = centred * torch.rsqrt(var + norm.eps).view(shape)
    return (y * norm.weight.view(shape) + norm.bias.view(shape) if norm.affine else y).to(dtype)


@torch.no_grad()
def _update_running_stats(norm, mean, unbiased_var):
    norm.num_batches_tracked += 1
    momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    norm.running_mean.lerp_(mean, momentum)
    norm.running_var.lerp_(unbiased_var, momentum)


class _GlobalStatisticsBatchNorm:
    """Mixed into a BatchNorm's own class: batch statistics of the global batch when it uses batch statistics."""

    def forward(self, x):
        uses_batch_stats = self.training or self.running_mean is None
        if uses_batch_stats and is_distributed():
            return _global_batch_norm(self, x)
        return super().forward(x)


def synchronise_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm in `module` computes its training statistics over all ranks. Each layer keeps its class
    (a subclass is mixed in), its parameters, buffers and state-dict keys."""
    for layer in module.modules():
        cls = type(layer)
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and not issubclass(cls, _GlobalStatisticsBatchNorm):
            layer.__class__ = type(f"Synchronised{cls.__name__}", (_GlobalStatisticsBatchNorm, cls), {})
    return module


# ---------------------------------------------------------------- DP-SGD: noise once per step

def make_private_data_parallel(engine, module: nn.Module, optimizer, data_loader, expected_batch_size: int,
                               **make_private_kwargs):
    """`engine.make_private(...)` for this process group, with the single-process mechanism.

    Under several processes the module is wrapped in Opacus's DPDDP (rank 0's parameters broadcast), so Opacus
    builds its distributed DP optimizer: per-sample clipping on each rank, noise of std sigma * C on rank 0 only,
    then the all-reduce, divided by the per-process expected batch and the number of processes: (sum of clipped
    gradients + one noise) / B. `expected_batch_size` is the global B = q * N. Returns what make_private returns.
    """
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    if is_distributed():
        module = DPDDP(module)
    wrapped = engine.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                  **make_private_kwargs)
    wrapped[1].expected_batch_size = expected_batch_size / world_size()  # Opacus's per-process convention
    return wrapped


def unwrap_data_parallel(module: nn.Module) -> nn.Module:
    """The module inside Opacus's DPDDP wrapper (itself when not wrapped)."""
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    return module.module if isinstance(module, DPDDP) else module


def local_poisson_batch(indices) -> tuple:
    """(this rank's indices, global batch size) of a Poisson batch that every rank drew identically."""
    return local_part(list(indices)), len(indices)
