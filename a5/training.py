"""Training: resumable samplers, the warm-up schedule, checkpoints, distributed helpers and
`train_detector`.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn, optim
from torch.utils.data import DataLoader, Dataset

from a5.utils import PathLike, autocast_dtype, default_amp, move_to_device, resolve_device
from a5.progress import ProgressReporter, _arg_name, _progress_mode
from a5.data import _unwrap_subset, infinite_loader
from a5.cache import CachedFeatureDataset


# ======================================================================================
# Training: samplers that make exact resume possible
# ======================================================================================


def _mix_seed(*numbers: int) -> int:
    """A well-spread 62-bit seed from several integers (seed, epoch, ...)."""
    digest = hashlib.sha256(":".join(str(int(n)) for n in numbers).encode()).hexdigest()
    return int(digest[:15], 16)


class ResumableSampler(torch.utils.data.Sampler):
    """Yields `(index, item_seed)` pairs; the order is a pure function of (seed, epoch).

    * Shuffling uses a generator seeded from `(seed, epoch)`, never the global RNG, so a
      resumed run sees exactly the same batches as an uninterrupted one.
    * Every item also gets its own seed; `_SeededItems` runs the dataset's `__getitem__`
      with torch's RNG set to it, which makes the random augmentation independent of
      worker processes and of where training was interrupted.
    * Distributed training: the epoch's order is padded to a multiple of `world_size`
      and each rank takes every `world_size`-th element (like DistributedSampler).
    * `set_epoch(epoch, start)` skips the first `start` samples of that epoch (resume).
    """

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.num_items, self.seed, self.shuffle = num_items, int(seed), shuffle
        self.rank, self.world_size = rank, world_size
        self.num_samples = math.ceil(num_items / world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> Tuple[List[int], List[int]]:
        """This rank's `(indices, item_seeds)` for `epoch`."""
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
        perm = torch.randperm(self.num_items, generator=gen) if self.shuffle else torch.arange(self.num_items)
        seeds = torch.randint(0, 2**62, (self.num_items,), generator=gen)
        total = self.num_samples * self.world_size
        if total > self.num_items:  # pad by wrapping around, as DistributedSampler does
            reps = math.ceil(total / self.num_items)
            perm, seeds = perm.repeat(reps)[:total], seeds.repeat(reps)[:total]
        return perm[self.rank :: self.world_size].tolist(), seeds[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices, seeds = self.order(self.epoch)
        start, self.start = self.start, 0
        return iter(list(zip(indices, seeds))[start:])

    def __len__(self) -> int:
        return self.num_samples


class _SeededItems(Dataset):
    """Wraps a dataset so that `ds[(index, seed)]` is `dataset[index]` computed with
    torch's RNG seeded by `seed` (and the caller's RNG state left untouched)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class _TrainStream:
    """Endless stream of training batches that can start at any iteration.

    Built from the loader given to `train_detector`: its dataset, batch size, collate
    function, workers and pin_memory are reused, but the order comes from a
    `ResumableSampler` (shuffled unless the loader used a SequentialSampler), so that
    resuming at iteration k fast-forwards to the right batch without loading images.
    A `CachedFeatureDataset` is read by indexing its stored tensors with whole batches
    (no per-item Python work, no worker processes).
    """

    def __init__(self, loader: DataLoader, seed: int, rank: int, world_size: int):
        self.loader = loader
        self.dataset = loader.dataset
        self.batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 1
        self.drop_last = bool(loader.drop_last)
        shuffle = not isinstance(loader.sampler, torch.utils.data.SequentialSampler)
        self.sampler = ResumableSampler(len(self.dataset), seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
        n = len(self.sampler)
        self.batches_per_epoch = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        if self.batches_per_epoch == 0:  # fewer items than one batch: keep the partial one
            self.drop_last, self.batches_per_epoch = False, 1
        base, self.base_indices = _unwrap_subset(self.dataset)
        self.cached = base if isinstance(base, CachedFeatureDataset) else None
        self._dl: Optional[DataLoader] = None

    def _image_loader(self) -> DataLoader:
        if self._dl is None:
            workers = self.loader.num_workers
            self._dl = DataLoader(
                _SeededItems(self.dataset),
                batch_size=self.batch_size,
                sampler=self.sampler,
                collate_fn=self.loader.collate_fn,
                num_workers=workers,
                pin_memory=self.loader.pin_memory,
                drop_last=self.drop_last,
                worker_init_fn=self.loader.worker_init_fn,
                persistent_workers=workers > 0,
                # A private generator: creating iterators must not consume global RNG.
                generator=torch.Generator().manual_seed(self.sampler.seed),
            )
        return self._dl

    def _epoch(self, epoch: int, first_batch: int) -> Iterator:
        if self.cached is not None:
            indices, seeds = self.sampler.order(epoch)
            B = self.batch_size
            for b in range(first_batch, self.batches_per_epoch):
                chunk = slice(b * B, (b + 1) * B)
                base = [self.base_indices[i] for i in indices[chunk]]
                variants = [s % self.cached.num_variants for s in seeds[chunk]]
                yield self.cached.get_batch(base, variants)
        else:
            self.sampler.set_epoch(epoch, start=first_batch * self.batch_size)
            yield from self._image_loader()

    def stream(self, start_iteration: int) -> Iterator:
        epoch, first = divmod(start_iteration, self.batches_per_epoch)
        while True:
            yield from self._epoch(epoch, first)
            epoch, first = epoch + 1, 0


# ======================================================================================
# Training: schedule, checkpoints, distributed helpers
# ======================================================================================


class WarmupLR(optim.lr_scheduler.LRScheduler):
    """Linear warm-up, then step decay (x0.1 at 60% and 90% of training) or cosine.

    The factor is a pure function of the iteration, so the scheduler's only state is
    `last_epoch` (= iterations done): resuming just restores that number.
    """

    def __init__(
        self,
        optimizer: optim.Optimizer,
        max_iters: int,
        warmup_iters: int = 0,
        warmup_factor: float = 1e-3,
        schedule: str = "step",
        milestones: Sequence[float] = (0.6, 0.9),
        gamma: float = 0.1,
        last_epoch: int = -1,
    ):
        if schedule not in ("step", "cosine"):
            raise ValueError(f"lr_schedule must be 'step' or 'cosine', not {schedule!r}")
        self.max_iters, self.warmup_iters, self.warmup_factor = max_iters, warmup_iters, warmup_factor
        self.schedule, self.gamma = schedule, gamma
        self.milestones = [int(m * max_iters) for m in milestones]
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, it: int) -> float:
        if self.schedule == "step":
            factor = self.gamma ** sum(it >= m for m in self.milestones)
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * min(it, self.max_iters) / max(self.max_iters, 1)))
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor

    def get_lr(self) -> List[float]:
        return [base * self.lr_factor(self.last_epoch) for base in self.base_lrs]

    def jump_to(self, iteration: int) -> None:
        """Continue at `iteration` (resume): the schedule is a function of the iteration, so set
        the learning rates of that iteration directly (calling `step()` here would warn)."""
        self.last_epoch = iteration
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self.lr_factor(iteration)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def _dist_info() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: Union[str, torch.device] = "auto") -> Tuple[int, int, torch.device]:
    """Join the process group when launched by `torchrun` (WORLD_SIZE > 1).

    Backend: NCCL for CUDA, gloo for CPU. Each process uses GPU `LOCAL_RANK`.
    Returns `(rank, world_size, device)`; outside torchrun `(0, 1, device)`.
    """
    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    rank, world = _dist_info()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return rank, world, device


def _rng_state() -> Dict[str, Any]:
    """All RNG states, in types that `torch.load(weights_only=True)` accepts (tensors,
    tuples, ints, floats, strings): NumPy's key array is stored as an int64 tensor."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()), int(pos), int(has_gauss),
                  float(cached)),
        "python": random.getstate(),
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)  # old files: an ndarray
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


@contextlib.contextmanager
def _preserved_rng():
    """Run a block (e.g. validation) without disturbing the training RNG streams."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> None:
    """Atomic save: write a temporary file, then rename it over `path`, so an
    interrupted save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise


def _numpy_array_globals() -> List[Any]:
    """What unpickling a plain NumPy array refers to (NumPy 1 and 2 spell it differently)."""
    core = getattr(np, "_core", None) or np.core
    return [np.ndarray, np.dtype, core.multiarray._reconstruct] + [
        getattr(np.dtypes, name) for name in ("UInt32DType", "Int64DType", "Float64DType")
        if hasattr(getattr(np, "dtypes", None), name)
    ]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot (or may not safely) be loaded; the message names it."""


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu", *,
                    trusted: bool = False) -> Dict[str, Any]:
    """Load a checkpoint written by `train_detector` / the command line.

    Files are read with `torch.load(..., weights_only=True)`, which only rebuilds
    tensors and plain containers and never runs code from the file: checkpoints exchanged
    between students and instructors are safe to open. Everything `train_detector`
    stores (weights, optimizer, RNG states, history, config) is in those types.

    Plain NumPy arrays (the RNG state of earlier versions' checkpoints) are allowed too.
    A file that needs arbitrary unpickling (files made by other code, arbitrary objects)
    is refused with a `CheckpointError`, unless `trusted=True` says that you trust
    where it comes from (command line: `--trust-checkpoint`). An empty, truncated or
    non-checkpoint file also raises a `CheckpointError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"Checkpoint file {path} is empty (0 bytes): not a checkpoint (an interrupted copy "
                              "or a full disk?)")
    try:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            # Checkpoints of earlier versions stored NumPy's RNG state as an ndarray: allow
            # plain NumPy arrays (no code runs to rebuild them), nothing else.
            with torch.serialization.safe_globals(_numpy_array_globals()):
                state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... by case
        with open(path, "rb") as f:
            head = f.read(2)
        looks_like_torch = zipfile.is_zipfile(path) or head[:1] == b"\x80"
        if not looks_like_torch:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({size} bytes, neither a torch zip "
                                  "archive nor a pickle): truncated, corrupt or another kind of file?") from err
        if not trusted:
            first = str(err).strip().splitlines()
            detail = next((line for line in first if "Unsupported global" in line or "GLOBAL" in line),
                          first[0] if first else type(err).__name__)
            raise CheckpointError(
                f"Refusing to load {path}: it needs arbitrary unpickling, which can run any code stored in "
                f"the file ({detail.strip()[:300]}). Checkpoints written by this version load safely. If you "
                "trust where this file comes from, pass trusted=True (command line: --trust-checkpoint)."
            ) from err
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err2:
            raise CheckpointError(f"Cannot load checkpoint {path}: {type(err2).__name__}: {err2}") from err2
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected a dict with 'model', "
                              f"got {type(state).__name__}{' with keys ' + ', '.join(map(str, list(state)[:8])) if isinstance(state, dict) else ''})")
    return state


_NUMBERED_CHECKPOINT = re.compile(r"^ckpt_(\d+)\.pt$")


def numbered_checkpoints(checkpoint_dir: PathLike) -> List[Tuple[int, Path]]:
    """`[(iteration, path), ...]` of the kept `ckpt_<iteration>.pt` files, oldest first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _NUMBERED_CHECKPOINT.match(child.name)
        if match and child.is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def load_resumable(last: PathLike, map_location: Union[str, torch.device] = "cpu", *, trusted: bool = False,
                   warn: bool = True) -> Tuple[Path, Dict[str, Any]]:
    """`(path, checkpoint)` of `last` (a run's `last.pt`), or, when that file cannot be
    read (a bad copy, a disk fault), of the newest readable `ckpt_<iteration>.pt` beside
    it, with a warning that names both. Raises the error of `last` if none loads."""
    last = Path(last)
    try:
        return last, load_checkpoint(last, map_location=map_location, trusted=trusted)
    except CheckpointError as err:
        for _, candidate in reversed(numbered_checkpoints(last.parent)):
            try:
                ckpt = load_checkpoint(candidate, map_location=map_location, trusted=trusted)
            except CheckpointError:
                continue
            if warn:
                warnings.warn(f"{err}\nResuming from {candidate} instead.")
            return candidate, ckpt
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` a copy of `src` atomically (a hard link when the file system allows)."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _nonfinite_entries(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _describe_images(paths: Any, limit: int = 8) -> str:
    """'a.jpg, b.jpg, ... (N images)' for the paths of a batch."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    try:
        names = [str(p) for p in paths]
    except TypeError:
        return "unknown images"
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} images)" if len(names) > limit else "")
    return shown or "no image names"


def _rollback_after_nonfinite(checkpoint_dir: Path, bad_iteration: int, written: Sequence[int],
                              resumed_from: Optional[int]) -> Optional[Tuple[int, Path]]:
    """Point `last.pt` at the newest kept checkpoint from before `bad_iteration`.

    Only this run's checkpoints count: those it `written`, and those up to
    `resumed_from` when it resumed (files of an unrelated earlier run in the folder
    are left alone). Checkpoints at or after `bad_iteration` hold the state that
    produced the non-finite values (resuming them would fail again at the same batch):
    they are renamed `ckpt_<it>.nonfinite.pt` (kept for inspection, never chosen again).
    Returns `(iteration, path)` of the checkpoint now in `last.pt`, or None.
    """
    ours = [(i, p) for i, p in numbered_checkpoints(checkpoint_dir)
            if i in set(written) or (resumed_from is not None and i <= resumed_from)]
    for iteration, path in ours:
        if iteration >= bad_iteration:
            os.replace(path, path.with_name(f"ckpt_{iteration:07d}.nonfinite.pt"))
    good = [(i, p) for i, p in ours if i < bad_iteration]
    if not good:
        last = checkpoint_dir / "last.pt"
        if ours and last.is_file():  # the state that produced the NaN must not be resumed by default
            os.replace(last, checkpoint_dir / f"last.nonfinite_{bad_iteration:07d}.pt")
        return None
    iteration, path = good[-1]
    _link_or_copy(path, checkpoint_dir / "last.pt")
    return iteration, path


def _new_history() -> Dict[str, list]:
    return {"iteration": [], "lr": [], "total_loss": [], "val": []}


def _loss_stats(history: Dict[str, list], terms: Sequence[str], window: int) -> Dict[str, float]:
    """Losses for the progress line: means over the last `window` iterations (one batch is
    noisy), 3 significant digits; loss terms lose their "loss_" prefix ("cls 0.51")."""
    stats = {"loss": float(f"{np.mean(history['total_loss'][-window:]):.3g}")}
    for key in terms:
        if history.get(key):
            stats[key.replace("loss_", "")] = float(f"{np.mean(history[key][-window:]):.3g}")
    return stats


# ======================================================================================
# Training: the loop
# ======================================================================================


def _check_train_args(max_iters: int, log_period: int, checkpoint_period: int, keep_checkpoints: int,
                      skip_nonfinite: int) -> None:
    if int(keep_checkpoints) < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, not {keep_checkpoints}")
    if int(skip_nonfinite) < 0:
        raise ValueError(f"skip_nonfinite must be >= 0, not {skip_nonfinite}")
    for name, value in (("max_iters", max_iters), ("log_period", log_period), ("checkpoint_period", checkpoint_period)):
        if int(value) < (0 if name == "max_iters" else 1):
            raise ValueError(f"{name} must be {'>= 0' if name == 'max_iters' else '>= 1'}, not {value}")


class _TrainRun:
    """The state of one `train_detector` call, and its steps: setup and resume (`__init__`,
    `resume`, `batches`), one step with its NaN guard (`step`, `nonfinite`), logging
    (`record`, `validate`) and checkpointing (`save`, `maybe_save`)."""

    def __init__(self, detector: nn.Module, device: Union[str, torch.device], *, learning_rate: float,
                 weight_decay: float, momentum: float, max_iters: int, lr_schedule: str,
                 warmup_iters: Optional[int], warmup_factor: float, amp: Optional[bool],
                 amp_dtype: Optional[torch.dtype], checkpoint_dir: Optional[PathLike], checkpoint_period: int,
                 keep_checkpoints: int, grad_clip: Optional[float], skip_nonfinite: int,
                 model_config: Optional[Dict[str, Any]]):
        self.rank, self.world, self.device = init_distributed(device)
        detector.to(self.device)
        self.detector, self.model = detector, detector
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                detector, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.params = [p for p in detector.parameters() if p.requires_grad]
        self.optimizer = optim.SGD(self.params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
        if warmup_iters is None:
            warmup_iters = min(500, max_iters // 10)
        self.scheduler = WarmupLR(self.optimizer, max_iters, warmup_iters, warmup_factor, lr_schedule)
        self._setup_amp(amp, amp_dtype)
        self.max_iters, self.checkpoint_period, self.keep_checkpoints = max_iters, checkpoint_period, keep_checkpoints
        self.grad_clip, self.skip_nonfinite, self.model_config = grad_clip, skip_nonfinite, model_config
        self.ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
        self.history = _new_history()
        self.start_iter, self.restored_rng, self.resume_path = 0, None, None
        self.written: List[int] = []  # iterations of the checkpoints this call saved
        self.seed: Optional[int] = None

    def _setup_amp(self, amp: Optional[bool], amp_dtype: Optional[torch.dtype]) -> None:
        self.use_amp = default_amp(self.device) if amp is None else bool(amp)
        self.amp_dtype = autocast_dtype(self.device) if amp_dtype is None else amp_dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)
        if self.use_amp and self.rank == 0:
            print(f"Mixed precision: {str(self.amp_dtype).replace('torch.', '')} autocast on {self.device.type} "
                  f"(losses in float32; {_arg_name('amp=False', '--no-amp')} turns it off).")

    # -- setup and resume ----------------------------------------------------------------
    def resume(self, resume: Union[bool, PathLike], trusted: bool, seed: Optional[int]) -> None:
        """Restore the state of `resume` (True: `last.pt`; a path: that file), then fix the seed
        (drawn from torch's RNG when none is given, rank 0's under DDP)."""
        if resume:
            self.resume_path = Path(resume) if not isinstance(resume, bool) else self.ckpt_path
            if self.resume_path is None:
                raise ValueError("resume=True needs checkpoint_dir (or pass the checkpoint path as resume=...)")
            if not self.resume_path.is_file():
                if self.rank == 0:
                    print(f"No checkpoint at {self.resume_path}; starting from scratch.")
                self.resume_path = None
        if self.resume_path is not None:
            seed = self._load_resume_state(resume, trusted)
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        if self.world > 1:  # every rank must use rank 0's seed for the shared data order
            seed_t = torch.tensor([seed], dtype=torch.int64,
                                  device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(seed_t, src=0)
            seed = int(seed_t.item())
        self.seed = seed

    def _load_resume_state(self, resume: Union[bool, PathLike], trusted: bool) -> int:
        if isinstance(resume, bool):  # last.pt, or the newest readable ckpt_*.pt if it is damaged
            self.resume_path, ckpt = load_resumable(self.resume_path, map_location=self.device, trusted=trusted,
                                                    warn=self.rank == 0)
        else:  # an explicitly named file is never replaced by another
            ckpt = load_checkpoint(self.resume_path, map_location=self.device, trusted=trusted)
        self.detector.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt.get("scaler") or {})
        self.start_iter = int(ckpt["iteration"])
        self.scheduler.jump_to(self.start_iter)
        self.history = ckpt.get("history") or self.history
        rngs = ckpt.get("rng_per_rank") or [ckpt.get("rng")]
        self.restored_rng = rngs[self.rank] if self.rank < len(rngs) else rngs[0]
        if self.model_config is None:
            self.model_config = ckpt.get("config")
        if self.rank == 0:
            print(f"Resumed from {self.resume_path} at iteration {self.start_iter}.")
        return int(ckpt["seed"])

    def batches(self, train_loader: Iterable) -> Iterator:
        """The training batches from `start_iter` on (a resumable, seeded order for a DataLoader)."""
        if isinstance(train_loader, DataLoader) and not isinstance(train_loader.dataset,
                                                                   torch.utils.data.IterableDataset):
            batches = _TrainStream(train_loader, self.seed, self.rank, self.world).stream(self.start_iter)
        else:
            if self.resume_path is not None and self.rank == 0:
                warnings.warn("train_loader is not a DataLoader: resuming cannot restore the data order exactly")
            batches = infinite_loader(train_loader)
        if self.restored_rng is not None:
            _set_rng_state(self.restored_rng)
        return batches

    # -- one step with its NaN guard -----------------------------------------------------
    def step(self, it: int, images: Any, gt_boxes: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], List[float],
                                                                             Optional[str]]:
        """Forward and backward; returns the losses, their values (averaged across ranks,
        total first) and a description of the problem when a loss or the gradient is not
        finite (then no update was made)."""
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            losses = self.model(images, gt_boxes)
        # Ignore keys like "proposals" that some detectors return next to the losses.
        losses = {k: v for k, v in losses.items() if "loss" in k}
        total_loss = sum(losses.values())

        # One sync per iteration: the NaN guard and the log need the values anyway.
        values = torch.stack([total_loss.detach().float()] + [v.detach().float() for v in losses.values()])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        values = values.tolist()
        problem = None
        if not all(math.isfinite(v) for v in values):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, values[1:]))
            problem = f"Non-finite loss at iteration {it}: total={values[0]:.4g} ({terms})"

        self.optimizer.zero_grad(set_to_none=True)
        if problem is None:
            problem = self._backward(it, total_loss)
        if problem is None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return losses, values, problem

    def _backward(self, it: int, total_loss: torch.Tensor) -> Optional[str]:
        scaler = self.scaler
        scaler.scale(total_loss).backward()
        if self.grad_clip is not None or not scaler.is_enabled():
            scaler.unscale_(self.optimizer)
            # max_norm=inf only measures; the fp16 GradScaler skips inf steps by itself.
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip is not None
                                                  else float("inf"))
            if not scaler.is_enabled() and not math.isfinite(float(norm)):
                return f"Non-finite gradient norm ({float(norm):.4g}) at iteration {it}"
        return None

    def nonfinite(self, it: int, paths: Any, problem: str, bar: ProgressReporter) -> None:
        """Skip the bad batch (while `skip_nonfinite` allows), else roll the checkpoints back
        and raise FloatingPointError."""
        images_text = _describe_images(paths)
        skipped = self.history.setdefault("skipped", [])
        if len(skipped) < int(self.skip_nonfinite):
            skipped.append({"iteration": it, "images": [str(p) for p in paths] if not isinstance(paths, str) else [paths]})
            if self.rank == 0:
                warnings.warn(f"{problem}; skipped the batch of images {images_text} "
                              f"({len(skipped)} of at most {self.skip_nonfinite} skips).")
            self.scheduler.step()
            bar.update(1)
            self.maybe_save(it + 1)
            return
        where = "no checkpoint_dir was given, nothing saved"
        if self.ckpt_path is not None:
            rolled = None
            if self.rank == 0:
                rolled = _rollback_after_nonfinite(self.ckpt_path.parent, it, self.written,
                                                   self.start_iter if self.resume_path is not None else None)
            if rolled is not None:
                where = (f"{self.ckpt_path} now holds the last good checkpoint, iteration {rolled[0]} "
                         f"({rolled[1].name}); nothing was overwritten")
            else:
                where = (f"there is no good checkpoint from before iteration {it} in {self.ckpt_path.parent}, so "
                         "nothing was saved (the state just before this batch would fail again at it)")
        bar.close()
        raise FloatingPointError(
            f"{problem}, batch images: {images_text}; {where}. Resume with a lower learning rate or stronger "
            "gradient clipping, or skip such batches with skip_nonfinite=N (command line: --skip-nonfinite N)."
        )

    # -- logging -------------------------------------------------------------------------
    def record(self, it: int, losses: Dict[str, torch.Tensor], values: List[float], lr: float,
               log_period: int, bar: ProgressReporter) -> None:
        history = self.history
        history["iteration"].append(it)
        history["lr"].append(lr)
        history["total_loss"].append(values[0])
        for key, value in zip(losses, values[1:]):
            history.setdefault(key, []).append(value)
        if it % log_period == 0 or it == self.max_iters - 1:
            bar.set_stats(**_loss_stats(history, list(losses), log_period), lr=float(f"{lr:.3g}"))
        bar.update(1)

    def validate(self, done: int, val_fn: Callable[[nn.Module], Dict[str, float]], bar: ProgressReporter) -> None:
        """Run `val_fn` on rank 0 with the training RNG state preserved."""
        if self.rank == 0:
            with _preserved_rng():
                metrics = val_fn(self.detector)
            self.history["val"].append({"iteration": done, **metrics})
            bar.write(f"train: iter {done}, validation: " + ", ".join(
                f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))))
        if self.world > 1:
            dist.barrier()
        self.model.train()

    # -- checkpointing -------------------------------------------------------------------
    def state(self, iteration: int, rng: Dict[str, Any]) -> Dict[str, Any]:
        rng_all = [rng]
        if self.world > 1:  # exact resume needs every rank's RNG state
            rng_all = [None] * self.world
            dist.all_gather_object(rng_all, rng)
        return {
            "format": "a5_helper.checkpoint/1",
            "model": self.detector.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": iteration,
            "max_iters": self.max_iters,
            "seed": self.seed,
            "rng": rng_all[0],
            "rng_per_rank": rng_all,
            "history": self.history,
            "config": self.model_config,
        }

    def maybe_save(self, done: int) -> None:
        """Save after `done` iterations when a checkpoint is due (every period and at the end)."""
        if self.ckpt_path is not None and (done % self.checkpoint_period == 0 or done == self.max_iters):
            self.save(done, _rng_state())

    def save(self, iteration: int, rng: Dict[str, Any]) -> None:
        state = self.state(iteration, rng)  # collective under DDP: all ranks call it
        ckpt_path = self.ckpt_path
        if self.rank != 0 or ckpt_path is None:
            return
        bad = _nonfinite_entries(state["model"])
        if bad:  # never replace a good state with a bad one
            warnings.warn(f"Not saving the checkpoint of iteration {iteration}: non-finite values in "
                          f"{', '.join(bad[:5])}; {ckpt_path} keeps the last good state.")
            return
        numbered = ckpt_path.parent / f"ckpt_{iteration:07d}.pt"
        save_checkpoint(state, numbered)
        self.written.append(iteration)
        _link_or_copy(numbered, ckpt_path)
        for _, old_path in numbered_checkpoints(ckpt_path.parent)[:-int(self.keep_checkpoints)]:
            old_path.unlink(missing_ok=True)


def train_detector(
    detector: nn.Module,
    train_loader: Iterable,
    learning_rate: float = 5e-3,
    weight_decay: float = 1e-4,
    max_iters: int = 5000,
    log_period: int = 20,
    device: Union[str, torch.device] = "cpu",
    *,
    momentum: float = 0.9,
    lr_schedule: str = "step",
    warmup_iters: Optional[int] = None,
    warmup_factor: float = 1e-3,
    grad_clip: Optional[float] = 10.0,
    amp: Optional[bool] = None,
    amp_dtype: Optional[torch.dtype] = None,
    checkpoint_dir: Optional[PathLike] = None,
    checkpoint_period: int = 500,
    resume: Union[bool, PathLike] = False,
    seed: Optional[int] = None,
    progress: Union[bool, str] = True,
    val_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
    val_period: Optional[int] = None,
    model_config: Optional[Dict[str, Any]] = None,
    keep_checkpoints: int = 3,
    skip_nonfinite: int = 0,
    trust_checkpoint: bool = False,
) -> Dict[str, list]:
    """Train the detector with SGD (momentum 0.9) and return the loss history.

    Schedule: linear warm-up over `warmup_iters` (default min(500, max_iters // 10))
    from `warmup_factor * learning_rate`, then step decay x0.1 at 60% and 90% of
    `max_iters` ("step", the course's schedule) or cosine decay ("cosine").

    Args:
        detector: in training mode `detector(images_or_feats, gt_boxes)` returns a dict
            of scalar losses (keys without "loss" are ignored, as in the course).
        train_loader: a DataLoader of `(image_paths, images, gt_boxes)` batches, where
            `images` is `(B, 3, H, W)` or a dict of cached features {"c3","c4","c5"}.
            Its dataset, batch size, collate function and workers are used with a
            resumable, seeded order (see `ResumableSampler`); any other iterable is
            consumed as is (then resuming is not exact).
        grad_clip: max total gradient norm (None disables clipping).
        amp: automatic mixed precision; default `default_amp(device)`: on for CUDA,
            and on CPUs with hardware bfloat16 (AMX / AVX512-BF16), off otherwise.
        amp_dtype: autocast dtype; default `autocast_dtype(device)`: float16 (with a
            GradScaler) on CUDA, bfloat16 on CPU.
        checkpoint_dir: where `ckpt_<iteration>.pt` is written every
            `checkpoint_period` iterations and at the end (atomically), and `last.pt`
            made the same file. It holds model, optimizer, scheduler, scaler,
            iteration, seed, RNG states, history and `model_config`, all loadable with
            `weights_only=True`. A state with non-finite weights is never saved.
        keep_checkpoints: how many `ckpt_<iteration>.pt` to keep (>= 1, newest first);
            the older ones let a non-finite loss roll back past the bad state.
        resume: True resumes from `checkpoint_dir/last.pt` if it exists; a path resumes
            from that file. On CPU with a fixed seed the resumed run logs exactly the
            same losses as an uninterrupted one.
        skip_nonfinite: how many batches whose loss or gradient is NaN / infinite may
            be skipped (no update; named in a warning and in `history["skipped"]`)
            before training stops with FloatingPointError. Default 0: stop at the first.
        trust_checkpoint: allow resuming from a file that needs arbitrary unpickling
            (see `load_checkpoint`).
        seed: seeds the data order and augmentation; default: drawn from torch's RNG
            (so `reset_seed(n)` beforehand makes training reproducible).
        progress: True: a progress bar on a terminal (or in Jupyter), else a plain line
            every `log_period` iterations and at most every $A5_PROGRESS_SECONDS (10)
            seconds, with the mean loss, speed and ETA (`ProgressReporter`); False: those
            plain lines always; "off": nothing.
        val_fn: `val_fn(detector) -> dict of metrics`, run (on rank 0) every
            `val_period` iterations (if given) and at the end, with the training RNG
            state preserved; results are stored in `history["val"]`.

    Returns:
        history: dict of per-iteration lists: "iteration", "lr", "total_loss" and one
            list per loss term, plus "val" (list of dicts).

    Raises:
        FloatingPointError: when a loss or gradient becomes NaN or infinite (after
            `skip_nonfinite` skipped batches). The message names the iteration and the
            batch's images. Nothing is saved at that point: `last.pt` is rolled back to
            the newest kept checkpoint from *before* that iteration (a later one, or the
            state just before the bad batch, would fail again at the same batch), so
            `resume=True` with a lower learning rate or stronger clipping continues from a
            good state. Checkpoints from that iteration on become `ckpt_<it>.nonfinite.pt`.

    Under `torchrun` (WORLD_SIZE > 1) the detector is wrapped in
    DistributedDataParallel (gloo on CPU, NCCL on GPU), each rank reads its own shard
    of every epoch, losses are averaged across ranks for logging, and only rank 0
    prints, saves checkpoints and runs `val_fn`.
    """
    # Long: the course API fixes the signature and the docstring documents every argument;
    # the code is 30 lines (the steps live in `_TrainRun`).
    _check_train_args(max_iters, log_period, checkpoint_period, keep_checkpoints, skip_nonfinite)
    run = _TrainRun(detector, device, learning_rate=learning_rate, weight_decay=weight_decay, momentum=momentum,
                    max_iters=max_iters, lr_schedule=lr_schedule, warmup_iters=warmup_iters,
                    warmup_factor=warmup_factor, amp=amp, amp_dtype=amp_dtype, checkpoint_dir=checkpoint_dir,
                    checkpoint_period=checkpoint_period, keep_checkpoints=keep_checkpoints, grad_clip=grad_clip,
                    skip_nonfinite=skip_nonfinite, model_config=model_config)
    run.resume(resume, trust_checkpoint, seed)
    batches = run.batches(train_loader)
    run.history.setdefault("skipped", [])
    run.model.train()
    bar = ProgressReporter(max_iters, "train", count_format="iter {n}/{total}", noun="iteration",
                           initial=run.start_iter, every=log_period,
                           mode=_progress_mode(progress, "lines") if run.rank == 0 else "off")
    for it in range(run.start_iter, max_iters):
        paths, images, gt_boxes = next(batches)
        losses, values, problem = run.step(it, move_to_device(images, run.device), gt_boxes.to(run.device))
        if problem is not None:
            run.nonfinite(it, paths, problem, bar)  # skips the batch, or raises FloatingPointError
            continue
        lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        run.record(it, losses, values, lr, log_period, bar)
        done = it + 1
        if val_fn is not None and ((val_period and done % val_period == 0) or done == max_iters):
            run.validate(done, val_fn, bar)
        run.maybe_save(done)
    bar.close()
    if run.world > 1:
        dist.barrier()
    return run.history
