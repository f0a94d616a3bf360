"""utils/run/distributed.py: 2 CPU processes (gloo) compute the single-process update.

One 2-process launch (torch.multiprocessing, the environment torchrun would set) runs every scenario below and
saves what each rank computed; the same scenario functions run in this process without a process group, and
the non-private one also through utils/gan/steps.py's single-process steps.
"""
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import check_inclusion_counts, check_poisson_batch_sizes
from forked import use_the_shared_server
from models import Discriminator, Generator
from models.generator import PrunableBatchNorm2d
from utils.data.datasets import EpochBatches, ImageSplit
from utils.gan.steps import nonprivate_discriminator_step, nonprivate_generator_step
from utils.run import distributed

WORLD = 2
BATCH, STEPS = 8, 2
FEATURES = 40  # the linear model of the DP scenarios
NOISE_FEATURES = 20000  # enough coordinates to measure the noise's std to about 1 %
SIGMA, CLIP = 1.0, 1.0
POISSON_N, POISSON_BATCH, POISSON_DRAWS = 400, 32, 2000  # the DP step's Poisson batches: q = 0.08


# ---------------------------------------------------------------- scenarios (run in 1 and in 2 processes)

def tiny_split(n: int = 48) -> ImageSplit:
    rng = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=rng)
    labels = torch.arange(n) % 10
    return ImageSplit(images, labels, "tiny", "public", torch.arange(n), "memory", {})


def tiny_gan():
    torch.manual_seed(0)
    return Generator(nz=8, num_classes=10, channels=(8, 6, 4)), Discriminator(num_classes=10, channels=(4, 4))


def adam(module):
    return torch.optim.Adam(module.parameters(), 1e-2, betas=(0.5, 0.999))


def gan_steps(sharded: bool) -> dict:
    """STEPS teacher steps (D then G) with utils/gan/steps.py's steps: with `sharded`, on this rank's part of every
    global batch of BATCH under `data_parallel`; otherwise the plain single-process code."""
    G, D = tiny_gan()
    g_opt, d_opt = adam(G), adam(D)
    batches = EpochBatches(tiny_split(), BATCH, seed=5)
    if sharded:
        distributed.data_parallel([G, D], [g_opt, d_opt])
        batches = distributed.ShardedBatches(batches)
    rng, losses = torch.Generator().manual_seed(1), []
    for real, labels in list(batches.epoch(0))[:STEPS]:
        losses.append(nonprivate_discriminator_step(G, D, d_opt, real, labels, rng))
        nonprivate_generator_step(G, D, g_opt, BATCH, rng, "cpu")
    return {"G": G.state_dict(), "D": D.state_dict(), "d_losses": losses, "rng": rng.get_state()}


def gan_steps_distributed() -> dict:
    return gan_steps(sharded=True)


def gan_steps_single_process() -> dict:
    return gan_steps(sharded=False)


def private_linear(features: int, expected_batch: int, sigma: float, loader_size: int = 64):
    """(model, DP optimizer, engine) for a bias-free linear model, through make_private_data_parallel."""
    from opacus import PrivacyEngine
    model = nn.Linear(features, 1, bias=False)
    nn.init.constant_(model.weight, 0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(loader_size, features)),
                                         batch_size=expected_batch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    module, optimizer, _ = distributed.make_private_data_parallel(
        engine, model, torch.optim.SGD(model.parameters(), lr=1.0), loader, expected_batch,
        noise_multiplier=sigma, max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode="hooks",
        noise_generator=torch.Generator().manual_seed(11))
    return module, optimizer, engine


def dp_step(module, optimizer, x_global: torch.Tensor) -> torch.Tensor:
    """One DP step on this rank's part of x_global (loss: mean output); the gradient the optimizer applied."""
    x = distributed.local_part(x_global)
    optimizer.zero_grad(set_to_none=True)
    if len(x):
        module(x).mean().backward()
    else:  # an empty local batch still joins the step (clipped sum 0), as utils/privacy/dp.py's empty_step does
        for p in optimizer.params:
            p.grad_sample, p.grad = p.new_zeros((0, *p.shape)), torch.zeros_like(p)
    optimizer.step()
    return optimizer.params[0].grad.detach().clone()


def clipping_batches() -> dict:
    """Global batches of BATCH examples with per-sample norms below C; the same with example 0 scaled by 1e4; the
    same without example 0; a batch of one example (one rank's part is empty)."""
    x = torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(2)) * (0.3 / FEATURES ** 0.5)
    huge = x.clone()
    huge[0] *= 1e4
    return {"plain": x, "huge": huge, "without": x[1:], "single": x[:1]}


def dp_gradients() -> dict:
    """The applied gradient of a sigma = 0 step on each clipping batch, and of a noisy step whose clipped sum is 0."""
    grads = {}
    for name, x in clipping_batches().items():
        module, optimizer, _ = private_linear(FEATURES, BATCH, sigma=0.0)
        grads[name] = dp_step(module, optimizer, x)
    module, optimizer, _ = private_linear(NOISE_FEATURES, BATCH, sigma=SIGMA)
    grads["noise"] = dp_step(module, optimizer, torch.zeros(BATCH, NOISE_FEATURES))  # zero inputs: zero gradients
    return grads


def dp_accounting(num_samples: int = 64, steps: int = 3) -> dict:
    """`steps` Poisson batches over num_samples with q = BATCH / num_samples: this rank's indices per step and the
    accountant's history (attached with the exact q, as utils/privacy/dp.py does)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    q = BATCH / num_samples
    data = torch.randn(num_samples, FEATURES, generator=torch.Generator().manual_seed(4))
    module, optimizer, engine = private_linear(FEATURES, BATCH, sigma=SIGMA, loader_size=num_samples)
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=q))
    sampler = UniformWithReplacementSampler(num_samples=num_samples, sample_rate=q,
                                            generator=torch.Generator().manual_seed(9))
    local_indices = []
    for _, indices in zip(range(steps), sampler):
        mine, _ = distributed.local_poisson_batch(indices)
        local_indices.append(mine)
        dp_step(module, optimizer, data[indices])
    return {"indices": local_indices, "history": [tuple(h) for h in engine.accountant.history],
            "weight": optimizer.params[0].detach().clone()}


def indexed_split(n: int) -> ImageSplit:
    """A private split of n images whose first two pixels spell their index, with its partition."""
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 0, 0], images[:, 0, 1] = torch.arange(n) % 256, torch.arange(n) // 256
    split = ImageSplit(images, torch.arange(n) % 10, "tiny", "private", torch.arange(n), "memory", {})
    split.partition = {"dataset": "tiny", "private_fingerprint": split.fingerprint}
    return split


def record_indices(images: torch.Tensor) -> list:
    """The indices of `indexed_split` records from their images as a batch hands them over ([-1, 1])."""
    pixels = torch.round((images[:, 0, 0, :2] + 1) * 127.5).long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def dp_poisson_draws() -> dict:
    """POISSON_DRAWS Poisson batches from the DP stage's own path (`DPStep.batches`, built as fine_tune.py builds
    it, on every rank): the records of this rank's part of each, the global size, then one DP step's accountant
    history and the ledger's q."""
    from utils.privacy import dp
    from utils.privacy.ledger import new_ledger
    from utils.run.lifecycle import Run, TrainConfig
    split = indexed_split(POISSON_N)
    config = dp.DPConfig(noise_multiplier=SIGMA, accountant="rdp")
    train = TrainConfig(batch_size=POISSON_BATCH, epochs=1, seed=0)
    ledger = new_ledger(split.partition)
    plan = dp.plan_run(config, train, split, ledger)
    G, D = tiny_gan()
    optimizers = {"g": adam(G), "d": adam(D)}
    distributed.data_parallel([G, D], [optimizers["g"]])
    step = dp.DPStep(G, D, optimizers, split, ledger, plan, config, train,
                     Run(os.path.join("never-written", "00000-test"), "private"))
    records, sizes = [], []
    for images, _, n_global in step.batches(0, POISSON_DRAWS):
        records.append(record_indices(images))
        sizes.append(n_global)
    step.pd.empty_step()
    step.record()
    return {"records": records, "n_global": sizes, "history": step.pd.history,
            "ledger_q": ledger["mechanisms"][0]["sample_rate"]}


def fake_pool_draws() -> dict:
    """--reuse-fakes' pool (utils/privacy/dp.py's FakePool) of 5 fakes of the tiny generator under data_parallel: a
    batch of 7 (the pool grows to two chunks, 10 fakes), then one of 3. This rank's fakes of each batch, the whole
    pool, the generator's BatchNorm running statistics and the latent stream's state."""
    from utils.privacy.dp import FakePool
    G, _ = tiny_gan()
    distributed.data_parallel([G])
    pool, rng = FakePool(5), torch.Generator().manual_seed(1)
    first, first_labels = pool.take(G, 7, rng, "cpu")
    second, _ = pool.take(G, 3, rng, "cpu")
    running = {key: value for key, value in G.state_dict().items() if "running" in key}
    return {"first": first, "first_labels": first_labels, "second": second, "pool": pool.fakes,
            "pool_labels": pool.labels, "running": running, "rng": rng.get_state()}


SCENARIOS = {"gan": gan_steps_distributed, "dp": dp_gradients, "accounting": dp_accounting,
             "poisson": dp_poisson_draws, "fake_pool": fake_pool_draws}


# ---------------------------------------------------------------- the 2-process launch

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    os.environ.update(env)
    with distributed.distributed("cpu", distributed.DistributedSettings(timeout_s=60)):
        results = {name: scenario() for name, scenario in SCENARIOS.items()}
        results["rank"], results["world"] = distributed.rank(), distributed.world_size()
        results["from_writer"] = distributed.from_writer(f"run-of-rank-{rank}")
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def launch(function, *args):
    """`function(rank, *args)` in WORLD processes forked from a fresh server process that imported torch, its
    compiler stack and Opacus once (a plain fork of pytest is unsafe once autograd's threads run; a spawn imports
    everything again in each process: seconds each on a loaded machine). The server is the suite's one
    (tests/forked.py), whichever test starts it."""
    use_the_shared_server()
    mp.start_processes(function, args=args, nprocs=WORLD, start_method="forkserver", join=True)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """What each of 2 gloo processes computed, by rank."""
    out_dir = str(tmp_path_factory.mktemp("distributed"))
    launch(worker, free_port(), out_dir)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process():
    assert not distributed.is_distributed()
    return {name: scenario() for name, scenario in SCENARIOS.items()}


def assert_states_close(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=atol, rtol=1e-4, msg=key)


# ---------------------------------------------------------------- single-process behaviour (no launch)

def test_single_process_is_the_identity():
    assert (distributed.rank(), distributed.world_size(), distributed.is_writer()) == (0, 1, True)
    assert distributed.local_part(list(range(5))) == list(range(5))
    assert distributed.global_mean(2.5, weight=3) == 2.5
    distributed.check_divisible(7)
    assert distributed.init_distributed("cpu", distributed.DistributedSettings(environ={})) == torch.device("cpu")
    assert not distributed.launched_with_several_processes({"WORLD_SIZE": "1"})
    assert distributed.launched_with_several_processes({"WORLD_SIZE": "2"})


def test_backend_follows_the_device():
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"


def test_shards_cover_the_batch_once_in_order():
    for n in (0, 1, 7, 8, 9):
        parts = [distributed.shard_bounds(n, r, 3) for r in range(3)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert max(s[1] - s[0] for s in parts) - min(s[1] - s[0] for s in parts) <= 1


def test_data_parallel_path_is_the_identity_in_one_process(one_process):
    reference = gan_steps_single_process()
    assert_states_close(one_process["gan"]["G"], reference["G"], atol=0)
    assert_states_close(one_process["gan"]["D"], reference["D"], atol=0)
    assert one_process["gan"]["d_losses"] == reference["d_losses"]


def test_synchronised_batchnorm_keeps_class_and_state_keys():
    G, _ = tiny_gan()
    keys = list(G.state_dict())
    distributed.synchronise_batchnorm(G)
    distributed.synchronise_batchnorm(G)  # twice is once
    assert isinstance(G.block0.norm, PrunableBatchNorm2d) and hasattr(G.block0.norm, "enforce_dead")
    assert type(G.block0.norm).__mro__.count(PrunableBatchNorm2d) == 1
    assert list(G.state_dict()) == keys


# ---------------------------------------------------------------- 2 processes against 1

def test_ranks_join_one_group(two_processes):
    assert [(r["rank"], r["world"]) for r in two_processes] == [(0, 2), (1, 2)]
    assert [r["from_writer"] for r in two_processes] == ["run-of-rank-0"] * 2  # e.g. the run directory's name


def test_two_process_gan_steps_match_one_process(two_processes, one_process):
    """Same global batch, latent draws, BatchNorm statistics (running ones included) and Adam updates."""
    reference = gan_steps_single_process()
    for result in two_processes:
        assert_states_close(result["gan"]["G"], reference["G"])
        assert_states_close(result["gan"]["D"], reference["D"])
        torch.testing.assert_close(result["gan"]["d_losses"], reference["d_losses"], atol=1e-5, rtol=1e-5)
        assert torch.equal(result["gan"]["rng"], reference["rng"])  # rank 0's generator state resumes every rank


def test_two_process_dp_gradients_match_one_process(two_processes, one_process):
    for result in two_processes:
        for name, grad in one_process["dp"].items():
            torch.testing.assert_close(result["dp"][name], grad, atol=1e-7, rtol=1e-5, msg=name)


def test_dp_per_sample_bound_holds_across_processes(two_processes):
    """One example scaled by 1e4 moves the update by at most C/B against the batch without it."""
    grads = two_processes[0]["dp"]
    x = clipping_batches()
    assert x["huge"][0].norm() > 10 * CLIP  # the scaled example's own gradient is far beyond C
    moved = (grads["huge"] - grads["without"]).norm().item()
    assert moved <= CLIP / BATCH * (1 + 1e-5)
    assert moved >= 0.99 * CLIP / BATCH  # clipped to C, not dropped
    unclipped = (grads["plain"] - grads["without"]).norm().item()
    torch.testing.assert_close(unclipped, x["plain"][0].norm().item() / BATCH, rtol=1e-4, atol=0)


def test_dp_noise_added_once_per_step(two_processes):
    """Zero gradients: the update is the noise / B, of std sigma * C / B (not sqrt(2) times that)."""
    noise = two_processes[0]["dp"]["noise"]
    assert noise.numel() == NOISE_FEATURES
    expected = SIGMA * CLIP / BATCH
    assert abs(noise.std().item() / expected - 1) < 0.05
    assert torch.equal(noise, two_processes[1]["dp"]["noise"])  # one update on every rank


def test_dp_poisson_batches_and_accounting_match_one_process(two_processes, one_process):
    reference = one_process["accounting"]
    for step, indices in enumerate(reference["indices"]):
        assert two_processes[0]["accounting"]["indices"][step] + two_processes[1]["accounting"]["indices"][step] \
            == indices
    for result in two_processes:
        assert result["accounting"]["history"] == reference["history"] == [(SIGMA, BATCH / 64, 3)]
        torch.testing.assert_close(result["accounting"]["weight"], reference["weight"], atol=1e-7, rtol=1e-5)


def test_dp_poisson_batches_of_the_ranks_together_are_one_sample_at_the_ledgers_q(two_processes, one_process):
    """The DP stage's batches under torchrun: the ranks' parts of every draw, put together in rank order, are the
    one Poisson sample a single process draws (no record on two ranks, none missing, the same global size on every
    rank), their sizes are Binomial(N, q) and every record goes in at rate q, with the q of the ledger and of the
    accountant's history on every rank."""
    reference, ranks = one_process["poisson"], [result["poisson"] for result in two_processes]
    q = reference["ledger_q"]
    assert q == POISSON_BATCH / POISSON_N and reference["history"] == [(SIGMA, q, 1)]
    for result in ranks:
        assert result["ledger_q"] == q and result["history"] == reference["history"]
        assert result["n_global"] == reference["n_global"]
    together = [first + second for first, second in zip(ranks[0]["records"], ranks[1]["records"])]
    assert together == reference["records"]
    assert [len(set(batch)) for batch in together] == [len(batch) for batch in together] == reference["n_global"]
    check_poisson_batch_sizes([len(batch) for batch in together], POISSON_N, q)
    counts = torch.bincount(torch.tensor([i for batch in together for i in batch]), minlength=POISSON_N)
    assert len(counts) == POISSON_N
    check_inclusion_counts(counts, POISSON_DRAWS, q)


def test_two_process_fake_pool_is_the_one_process_pool(two_processes, one_process):
    """Each rank generates its part of every chunk (BatchNorm statistics of the whole chunk) and gathers the rest:
    every rank holds the single process's pool, takes its part of each batch's first n, and the generator's running
    statistics and latent stream are the single process's."""
    reference, ranks = one_process["fake_pool"], [result["fake_pool"] for result in two_processes]
    assert len(reference["pool"]) == 10
    for result in ranks:
        torch.testing.assert_close(result["pool"], reference["pool"], atol=1e-5, rtol=1e-4)
        assert torch.equal(result["pool_labels"], reference["pool_labels"])
        assert_states_close(result["running"], reference["running"])
        assert torch.equal(result["rng"], reference["rng"])
    for key in ("first", "first_labels", "second"):
        together = torch.cat([result[key] for result in ranks])
        torch.testing.assert_close(together.float(), reference[key].float(), atol=1e-5, rtol=1e-4, msg=key)


def worker_whose_peer_dies(rank: int, port: int, out_dir: str):
    """Rank 1 leaves without a word; rank 0's next collective must fail (not wait for ever)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    distributed.init_distributed("cpu", distributed.DistributedSettings(timeout_s=20))
    distributed.barrier()
    if rank == 1:
        os._exit(0)
    try:
        distributed.global_mean(1.0)
        outcome = "returned"
    except Exception as exc:  # gloo: the peer closed its connection, or the collective timed out
        outcome = f"raised {type(exc).__name__}"
    with open(os.path.join(out_dir, "outcome"), "w") as handle:
        handle.write(outcome)
    os._exit(0)  # the group cannot be destroyed cleanly with a dead member


def test_a_dead_peer_fails_the_collective_instead_of_hanging(tmp_path):
    launch(worker_whose_peer_dies, free_port(), str(tmp_path))
    assert (tmp_path / "outcome").read_text().startswith("raised")


def test_generation_scripts_refuse_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(distributed.UserError, match="runs in one process"):
        distributed.single_process_device("cpu", "evaluate.py")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.single_process_device("cpu", "evaluate.py") == torch.device("cpu")
