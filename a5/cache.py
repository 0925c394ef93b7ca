"""Frozen backbone + feature cache: `build_feature_cache`, `CachedFeatureDataset`.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from a5.utils import PathLike, TensorDict, resolve_device
from a5.progress import ProgressReporter, _arg_name, _progress_mode, format_bytes, plural
from a5.data import _unwrap_subset


# ======================================================================================
# Frozen backbone + feature cache
# ======================================================================================

FEATURE_LEVELS = ("c3", "c4", "c5")
_CACHE_VERSION = 2  # 2: image content hashes in the key, per-file checksums


def _cache_files(levels: Sequence[str]) -> Tuple[str, ...]:
    """The files of a cache on disk that stores `levels`."""
    return tuple(f"{level}.npy" for level in levels) + ("gt_boxes.npy",)


def cached_levels(backbone: nn.Module) -> Tuple[str, ...]:
    """The feature levels a cache of `backbone` stores by default: c3 and c4 when it fine-tunes
    its last stage (`tune_last_stage`: its forward recomputes c5 from c4 at every step, so a
    cached c5 would never be read; for MobileNetV2 at 224 px, c5 is 59% of the cache), else
    c3, c4 and c5."""
    if getattr(_backbone_of(backbone), "tune_last_stage", False):
        return ("c3", "c4")
    return FEATURE_LEVELS


def _file_crc32(path: Path, chunk: int = 1 << 24) -> str:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _image_fingerprints(paths: Sequence[str], previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """`{path: [size, mtime_ns, sha1 of the content]}` for the image files.

    Fast path: a file whose size and modification time match `previous` keeps its
    recorded hash; any other file is read and hashed, so an image replaced under the
    same name changes the cache key even when its size is the same."""
    previous = previous or {}
    result: Dict[str, Any] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            result[path] = None  # not a file (a synthetic dataset): the key covers its description only
            continue
        old = previous.get(path)
        if old and old[0] == st.st_size and old[1] == st.st_mtime_ns:
            result[path] = list(old)
            continue
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        result[path] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return result


def _check_cache_files(cache_path: Path, checksums: Dict[str, Any],
                       levels: Optional[Sequence[str]] = None) -> Optional[str]:
    """None if every file of a cache of `levels` (None: every file `checksums` names) has its
    recorded size and checksum, else what is wrong (naming the file)."""
    if not checksums:
        return f"{cache_path / 'meta.json'} records no checksums"
    for name in _cache_files(levels) if levels is not None else sorted(checksums):
        path = cache_path / name
        want = checksums.get(name) or {}
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{path} has {size} bytes, expected {want.get('size')} (truncated or overwritten)"
        if _file_crc32(path) != want.get("crc32"):
            return f"{path} does not match its checksum (corrupt)"
    return None


@runtime_checkable
class CacheableBackbone(Protocol):
    """A backbone with a frozen feature extractor whose outputs can be cached
    (`fcos.DetectorBackboneWithFPN` with `freeze_backbone=True`): `extract_features(images)`
    gives `{"c3", "c4", "c5"}`; the parameters under `TRAINED_PREFIXES` are the layers trained
    on top of them (not part of the cache key). One with `tune_last_stage` also takes
    `extract_features(images, with_c5=False)` (its cache leaves c5 out)."""

    def extract_features(self, images: torch.Tensor) -> TensorDict: ...  # (, with_c5: bool = True)


@runtime_checkable
class RendersVariants(Protocol):
    """A dataset that renders each image in named versions, deterministically:
    `get_variant(index, variant, seed) -> (path, image, gt)` for "orig", "flip" and
    "jitter<k>" (`VOC2007DetectionTiny`); a feature cache stores these."""

    def get_variant(self, index: int, variant: str, seed: int = 0) -> Tuple[str, torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class ListsImageFiles(Protocol):
    """A dataset whose `instances[i][0]` is the path of image `i`'s file
    (`VOC2007DetectionTiny`); a cache on disk then notices an image replaced under the
    same name. Other datasets' images are named by their index."""

    instances: List[Tuple[str, Any]]


# The state-dict prefixes of the layers a CacheableBackbone trains on top of the cached
# features: DetectorBackboneWithFPN's FPN (fcos.py).
TRAINED_PREFIXES = ("fpn_params.",)


def _backbone_of(module: nn.Module) -> CacheableBackbone:
    """The CacheableBackbone of a detector (its `.backbone`), or the module itself."""
    if isinstance(module, CacheableBackbone):
        return module
    inner = getattr(module, "backbone", None)
    if isinstance(inner, CacheableBackbone):
        return inner
    raise TypeError("expected a DetectorBackboneWithFPN (with extract_features) or a detector with .backbone")


def backbone_state_hash(backbone: nn.Module) -> str:
    """SHA-1 of the feature extractor's weights and buffers; the trained layers (`TRAINED_PREFIXES`,
    and every parameter that requires a gradient, e.g. a last stage fine-tuned on top of the cache)
    are excluded, so that the key stays the same while they train."""
    trained = {name for name, param in backbone.named_parameters() if param.requires_grad}
    h = hashlib.sha1()
    for name, tensor in sorted(backbone.state_dict().items()):
        if name.startswith(TRAINED_PREFIXES) or name in trained:
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _VariantView(Dataset):
    """Item `j` is variant `j % V` of image `j // V` (for building the cache)."""

    def __init__(self, dataset: Dataset, base_indices: List[int], variants: Sequence[str], seed: int):
        self.dataset, self.base_indices, self.variants, self.seed = dataset, base_indices, list(variants), seed

    def __len__(self) -> int:
        return len(self.base_indices) * len(self.variants)

    def __getitem__(self, j: int):
        i, v = divmod(j, len(self.variants))
        _, image, gt = self.dataset.get_variant(self.base_indices[i], self.variants[v], seed=self.seed)
        return image, gt


class CachedFeatureDataset(Dataset):
    """Backbone features computed once per image and augmentation variant.

    Storage: for each level stored (`levels`: "c3", "c4" and "c5", or only "c3" and "c4"
    for a backbone that recomputes c5, see `cached_levels`) one array `(N * V, C, H, W)`
    (fp16 by default; a torch tensor in memory or a NumPy memmap on disk), where row
    `i * V + v` is variant `v` of image `i`; `gt_boxes` `(N * V, 40, 5)` holds the boxes
    transformed like that variant (flipped for "flip").

    Items are `(image_path, {level: float32 tensor}, gt_boxes)`, with a random variant per
    access; `collate_fn` stacks them into a batch. `train_detector` reads whole batches
    with `get_batch` instead (one tensor gather per level).
    """

    def __init__(
        self,
        features: Dict[str, Union[torch.Tensor, np.ndarray]],
        gt_boxes: torch.Tensor,
        image_paths: List[str],
        variants: Sequence[str],
        meta: Optional[Dict[str, Any]] = None,
    ):
        self.features = features
        self.gt_boxes = gt_boxes
        self.image_paths = list(image_paths)
        self.variants = list(variants)
        self.num_variants = len(self.variants)
        self.meta = meta or {}
        self.levels = tuple(level for level in FEATURE_LEVELS if level in features)
        c3 = features["c3"]
        self.image_size = (8 * c3.shape[-2], 8 * c3.shape[-1])

    def __len__(self) -> int:
        return len(self.image_paths)

    def _rows(self, level: str, rows: torch.Tensor) -> torch.Tensor:
        store = self.features[level]
        if isinstance(store, np.ndarray):  # memmap on disk: NumPy fancy indexing copies
            return torch.from_numpy(np.ascontiguousarray(store[rows.numpy()])).float()
        return store.index_select(0, rows).float()

    def get_batch(self, indices: Sequence[int], variant_ids: Sequence[int]) -> Tuple[List[str], TensorDict, torch.Tensor]:
        """A whole batch: `(paths, {"c3": (B, C3, H3, W3), ...} float32, gt (B, 40, 5))`
        (one entry per level in `self.levels`)."""
        rows = torch.as_tensor(indices, dtype=torch.long) * self.num_variants + torch.as_tensor(variant_ids, dtype=torch.long)
        feats = {k: self._rows(k, rows) for k in self.levels}
        return [self.image_paths[i] for i in indices], feats, self.gt_boxes.index_select(0, rows)

    def get_variant(self, index: int, variant_id: int):
        paths, feats, gt = self.get_batch([index], [variant_id])
        return paths[0], {k: v[0] for k, v in feats.items()}, gt[0]

    def __getitem__(self, index: int):
        variant_id = int(torch.randint(self.num_variants, (1,)).item())
        return self.get_variant(index, variant_id)

    @staticmethod
    def collate_fn(items: List[Tuple[str, TensorDict, torch.Tensor]]):
        """Stack a list of items: `(paths, dict of (B, ...) tensors, (B, 40, 5))`."""
        paths = [it[0] for it in items]
        feats = {k: torch.stack([it[1][k] for it in items]) for k in items[0][1]}
        return paths, feats, torch.stack([it[2] for it in items])


collate_cached = CachedFeatureDataset.collate_fn


def _cache_key(backbone: nn.Module, dataset: Dataset, base_indices: List[int], variants: Sequence[str],
               storage_dtype: torch.dtype, seed: int, fingerprints: Optional[Dict[str, Any]] = None,
               levels: Sequence[str] = FEATURE_LEVELS) -> Dict[str, Any]:
    items = [getattr(dataset, "instances", [None] * (max(base_indices) + 1))[i] for i in base_indices]
    items_hash = hashlib.sha1(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()
    contents = [fp[2] if fp else None for fp in (fingerprints or {}).values()]
    # A cache of every level has no "levels" entry: caches built before it stay valid.
    stored = {} if tuple(levels) == FEATURE_LEVELS else {"levels": list(levels)}
    return {
        **stored,
        "content_hash": hashlib.sha1(json.dumps(contents).encode()).hexdigest(),
        "version": _CACHE_VERSION,
        "backbone_name": str(getattr(backbone, "backbone_name", type(backbone).__name__)),
        "weights_name": str(getattr(backbone, "weights_name", "unknown")),
        "weights_hash": backbone_state_hash(backbone),
        "image_size": int(getattr(dataset, "image_size", 0)),
        "transform": str(getattr(dataset, "transform_signature", type(dataset).__name__)),
        "variants": list(variants),
        "variant_seed": seed,
        "storage_dtype": str(storage_dtype),
        "num_images": len(base_indices),
        "items_hash": items_hash,
    }


def build_feature_cache(
    backbone: nn.Module,
    dataset: Dataset,
    variants: Sequence[str] = ("orig", "flip"),
    cache_dir: Optional[PathLike] = None,
    batch_size: int = 16,
    device: Union[str, torch.device] = "cpu",
    storage_dtype: torch.dtype = torch.float16,
    num_workers: int = 0,
    progress: Union[bool, str] = True,
    on_mismatch: str = "rebuild",
    seed: int = 0,
    levels: Optional[Sequence[str]] = None,
) -> CachedFeatureDataset:
    """Run the frozen backbone once over every training image and variant.

    Args:
        backbone: a DetectorBackboneWithFPN built with `freeze_backbone=True` (or a
            detector whose `.backbone` is one); its `extract_features(images)` gives
            {"c3", "c4", "c5"}.
        dataset: a `VOC2007DetectionTiny` (or a Subset of one); its `get_variant`
            renders "orig", "flip" and "jitter<k>" deterministically.
        variants: which versions of each image to store. A training step picks one at
            random per image, like the random flip / crop of image training.
        cache_dir: None keeps the cache in memory; a folder stores one `.npy` memmap
            per level plus `gt_boxes.npy` and `meta.json`, reused by later runs when the
            key matches. The key covers backbone name, weights name, a hash of the
            backbone weights, image size, transform, variants, storage dtype and the
            list of images with a hash of each image file's content (re-read only when a
            file's size or modification time changed), so an image replaced under the
            same name is noticed. `meta.json` records each cache file's size and CRC32,
            checked on every load. A mismatched, incomplete, truncated or corrupt cache
            is named and rebuilt (`on_mismatch="rebuild"`) or refused
            (`on_mismatch="error"`), never reused.
        storage_dtype: torch.float16 (default, half the memory) or torch.float32.
        progress: True: a bar on a terminal, plain lines in a log (`ProgressReporter`);
            "lines": plain lines always; False / "off": silent.
        levels: the backbone features to store; None: `cached_levels(backbone)` (c3, c4
            and, unless the backbone recomputes it from c4, c5). Part of the key.

    Returns: a CachedFeatureDataset.
    """
    # Long: the docstring documents every argument (the reference); the code is 30 lines.
    fpn_backbone = _backbone_of(backbone)
    base, base_indices = _unwrap_subset(dataset)
    variants = list(variants)
    levels = cached_levels(fpn_backbone) if levels is None else tuple(levels)
    _check_cache_args(fpn_backbone, base, variants, storage_dtype, on_mismatch, levels)
    levels = tuple(level for level in FEATURE_LEVELS if level in levels)  # one order, one key
    N, V = len(base_indices), len(variants)
    paths = _image_paths(base, base_indices)

    cache_path = Path(cache_dir) if cache_dir is not None else None
    meta = _read_meta(cache_path)
    # Content hashes matter only for a cache on disk, which a later run may reuse.
    fingerprints = _image_fingerprints(paths, meta.get("files")) if cache_path is not None else {}
    key = _cache_key(fpn_backbone, base, base_indices, variants, storage_dtype, seed, fingerprints, levels)
    if cache_path is not None and (cache_path / "meta.json").is_file():
        reused, problem = _reuse_cache(cache_path, meta, key, fingerprints, paths, variants, progress, levels)
        if reused is not None:
            return reused
        message = _mismatch_message(cache_path, meta, key, fingerprints, problem)
        if on_mismatch == "error":
            raise RuntimeError(message + f"; delete it or choose another {_arg_name('cache_dir', '--cache-dir')}.")
        print(message + "; rebuilding it.")
    if cache_path is not None:
        cache_path.mkdir(parents=True, exist_ok=True)
        (cache_path / "meta.json").unlink(missing_ok=True)  # incomplete until the end
        # New files, not rewritten ones: a process still reading the old cache keeps its
        # data (its memory map holds the old file), and no stale level (a c5.npy that this
        # cache does not store) is left behind.
        for name in _cache_files(FEATURE_LEVELS):
            (cache_path / name).unlink(missing_ok=True)

    store, gt_all = _compute_features(fpn_backbone, base, base_indices, variants, seed, cache_path, batch_size,
                                      device, storage_dtype, num_workers, progress, levels)
    meta = {"key": key, "complete": True, "shapes": {k: list(v.shape) for k, v in store.items()}}
    if cache_path is not None:
        store = _finish_cache_files(cache_path, store, gt_all, meta, fingerprints)
    return CachedFeatureDataset(store, gt_all, paths, variants, meta)


def _image_paths(base: Dataset, base_indices: List[int]) -> List[str]:
    """The file of each cached image (its index, as text, when the dataset lists no files)."""
    if isinstance(base, ListsImageFiles):
        return [base.instances[i][0] for i in base_indices]
    return [str(i) for i in base_indices]


def _check_cache_args(fpn_backbone: CacheableBackbone, base: Dataset, variants: List[str],
                      storage_dtype: torch.dtype, on_mismatch: str, levels: Sequence[str]) -> None:
    inner = getattr(fpn_backbone, "backbone", None)
    # A last stage fine-tuned on top of the cache (tune_last_stage) may train: only its input,
    # c4, is read from the cache then.
    tuned = ({id(p) for p in fpn_backbone.last_stage().parameters()}
             if getattr(fpn_backbone, "tune_last_stage", False) else set())
    if inner is not None and any(p.requires_grad and id(p) not in tuned for p in inner.parameters()):
        raise ValueError(
            "build_feature_cache needs a frozen backbone (build the detector with "
            f"{_arg_name('freeze_backbone=True', '--frozen-backbone')}): "
            "features of a backbone that trains would go stale after the first step."
        )
    if storage_dtype not in (torch.float16, torch.float32):
        raise ValueError("storage_dtype must be torch.float16 or torch.float32")
    if on_mismatch not in ("rebuild", "error"):
        raise ValueError("on_mismatch must be 'rebuild' or 'error'")
    if not isinstance(base, RendersVariants):
        raise TypeError("dataset must provide get_variant(index, variant) (VOC2007DetectionTiny does)")
    if not variants:
        raise ValueError("variants must name at least one of 'orig', 'flip', 'jitter<k>'")
    # c3 and c4 always (the FPN's inputs and the tuned stage's), c5 unless the backbone recomputes it.
    needed = cached_levels(fpn_backbone)
    if not set(needed) <= set(levels) or not set(levels) <= set(FEATURE_LEVELS):
        raise ValueError(f"levels must hold {', '.join(needed)} for this backbone (and only levels of "
                         f"{', '.join(FEATURE_LEVELS)}), got {', '.join(levels) or 'none'}")


def _read_meta(cache_path: Optional[Path]) -> Dict[str, Any]:
    """The cache's meta.json ({} when there is none, {"corrupt": True} when unreadable)."""
    if cache_path is None or not (cache_path / "meta.json").is_file():
        return {}
    try:
        return json.loads((cache_path / "meta.json").read_text())
    except json.JSONDecodeError:
        return {"corrupt": True}


def _write_meta(cache_path: Path, meta: Dict[str, Any]) -> None:
    tmp = cache_path / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, cache_path / "meta.json")


def _reuse_cache(cache_path: Path, meta: Dict[str, Any], key: Dict[str, Any], fingerprints: Dict[str, Any],
                 paths: List[str], variants: List[str], progress: Union[bool, str], levels: Sequence[str],
                 ) -> Tuple[Optional[CachedFeatureDataset], Optional[str]]:
    """(the cached dataset, None) when the cache on disk matches `key` and is intact, else
    (None, what is damaged) or (None, None) for a cache of other inputs."""
    if meta.get("corrupt"):
        return None, f"{cache_path / 'meta.json'} is not valid JSON (corrupt)"
    if not (meta.get("complete") and meta.get("key") == key):
        return None, None
    problem = _check_cache_files(cache_path, meta.get("checksums") or {}, levels)
    if problem is not None:
        return None, problem
    try:
        feats = {k: np.load(cache_path / f"{k}.npy", mmap_mode="r") for k in levels}
        gt = torch.from_numpy(np.load(cache_path / "gt_boxes.npy"))
    except (ValueError, OSError, EOFError) as err:
        return None, f"a file under {cache_path} cannot be read ({err})"
    if meta.get("files") != fingerprints:  # same contents, new mtimes: refresh the fast path
        meta["files"] = fingerprints
        _write_meta(cache_path, meta)
    if _progress_mode(progress) != "off":
        size = sum(feats[k].nbytes for k in levels)
        print(f"Loaded feature cache from {cache_path} ({plural(len(paths), 'image')} x "
              f"{plural(len(variants), 'variant')}, {format_bytes(size)}); it was built by an earlier run.")
    return CachedFeatureDataset(feats, gt, paths, variants, meta), None


def _mismatch_message(cache_path: Path, meta: Dict[str, Any], key: Dict[str, Any], fingerprints: Dict[str, Any],
                      problem: Optional[str]) -> str:
    """Why the cache at `cache_path` cannot be used: damaged (`problem`) or built from other inputs."""
    if problem is not None:
        return f"Feature cache at {cache_path} is damaged: {problem}"
    old = meta.get("key") or {}
    diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    reason = "it is incomplete" if not meta.get("complete") else f"it differs in {', '.join(diff)}"
    if "content_hash" in diff and isinstance(meta.get("files"), dict):
        changed = [p for p, fp in fingerprints.items() if fp and (meta["files"].get(p) or [None] * 3)[2] != fp[2]]
        if changed:
            reason += f"; changed images: {', '.join(changed[:5])}" + (" ..." if len(changed) > 5 else "")
    return f"Feature cache at {cache_path} does not match this backbone/dataset ({reason})"


def _compute_features(fpn_backbone: CacheableBackbone, base: Dataset, base_indices: List[int], variants: List[str],
                      seed: int, cache_path: Optional[Path], batch_size: int, device: Union[str, torch.device],
                      storage_dtype: torch.dtype, num_workers: int, progress: Union[bool, str],
                      levels: Sequence[str] = FEATURE_LEVELS,
                      ) -> Tuple[Dict[str, Union[torch.Tensor, np.ndarray]], torch.Tensor]:
    """Run the frozen backbone over every image and variant: the features per level (memmaps
    under `cache_path`, else tensors) and the padded ground truth."""
    N, V = len(base_indices), len(variants)
    np_dtype = np.float16 if storage_dtype == torch.float16 else np.float32
    device = resolve_device(device)
    was_training = fpn_backbone.training
    fpn_backbone.to(device).eval()
    view = _VariantView(base, base_indices, variants, seed)
    loader = DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    store: Dict[str, Union[torch.Tensor, np.ndarray]] = {}
    gt_all = torch.full((N * V, getattr(base, "max_num_instances", 40), 5), -1.0)
    row = 0
    bar = ProgressReporter(N * V, "caching backbone features", count_format="{n}/{total} images", unit="img",
                           noun="image", mode=_progress_mode(progress))
    # Without c5 (a tuned last stage recomputes it): its stage does not even run.
    extract_kwargs = {} if "c5" in levels else {"with_c5": False}
    with torch.no_grad(), bar:
        for images, gt in loader:
            feats = fpn_backbone.extract_features(images.to(device), **extract_kwargs)
            for level in levels:
                f = feats[level].detach().to("cpu", storage_dtype)
                if level not in store:
                    shape = (N * V,) + tuple(f.shape[1:])
                    if cache_path is not None:
                        store[level] = np.lib.format.open_memmap(cache_path / f"{level}.npy", mode="w+",
                                                                 dtype=np_dtype, shape=shape)
                    else:
                        store[level] = torch.empty(shape, dtype=storage_dtype)
                store[level][row : row + len(f)] = f.numpy() if cache_path is not None else f
            gt_all[row : row + len(gt), : gt.shape[1]] = gt
            row += len(images)
            bar.update(len(images))
        bar.close()
    fpn_backbone.train(was_training)
    return store, gt_all


def _finish_cache_files(cache_path: Path, store: Dict[str, np.ndarray], gt_all: torch.Tensor, meta: Dict[str, Any],
                        fingerprints: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Flush the memmaps, write gt_boxes.npy and then meta.json (with checksums; the cache is
    complete from then on) and reopen the features read-only."""
    for level in store:
        store[level].flush()
    np.save(cache_path / "gt_boxes.npy", gt_all.numpy())
    meta["files"] = fingerprints
    meta["checksums"] = {name: {"size": (cache_path / name).stat().st_size, "crc32": _file_crc32(cache_path / name)}
                         for name in _cache_files(list(store))}
    _write_meta(cache_path, meta)
    return {k: np.load(cache_path / f"{k}.npy", mmap_mode="r") for k in store}
