"""
data.py: the files clipgen reads and writes, shared by training and inference: images (folders and tar
shards, a manifest of what was checked, robust RGB loading, augmentation, the step-indexed sampler that
makes runs reproducible), checkpoints (atomic writes, loading that never runs pickled code) and stage 2's
cache of tokens and embeddings (memory-mapped chunk files).

Everything here raises exceptions (ValueError, OSError) with a message a user can act on; the scripts turn
them into one `error:` line. Nothing here calls sys.exit, so library code (clipgen.CLIPGen) can use it.

    refs, bad = readable_images("imgs/")           # or "shards/{0000..0099}.tar"
    x = ImageFolder(refs, 64)[0]                   # (3, 64, 64) center crop in [-1, 1]
"""
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler
from torchvision import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# -----------------------------------------------------------------------------------------------------------
# Where images come from. --data names image files in a folder (searched recursively) and/or WebDataset-style
# tar shards (what img2dataset writes for LAION and CC12M: members key.jpg, key.txt, key.json...; image
# members are used, the rest ignored). Either way an image is an ImageRef: a file, or a byte range of a
# shard. Reading a member at its offset, rather than streaming the shard front to back, keeps the data of
# a training step a function of the step (see batch_indices), so shards get the same guarantees as files.
#
# Checking every image header takes minutes at a million files, so it is done once per source (file or
# shard) and remembered in a manifest in the run folder, keyed by each source's size and modification time:
# a later run, or another process, only re-checks what changed. A run should never die hours in because of
# one bad file, nor silently train on fewer images than the user thinks: bad images are dropped up front
# (and named by the caller), and one that only fails when decoded is replaced by the next one.


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One image: the file `path`, or, when `member` is set, `size` bytes at `offset` in the tar shard `path`."""
    path: str
    member: str = ""
    offset: int = 0
    size: int = -1

    def open(self):
        """Something PIL's Image.open reads: the path, or the member's bytes (one seek and one read)."""
        if not self.member:
            return self.path
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return io.BytesIO(f.read(self.size))

    def __str__(self):
        return f"{self.path}:{self.member}" if self.member else self.path


def expand_braces(pattern):
    """Shell-style braces, as WebDataset's shard lists use them: 'a/{000..002}.tar' -> a/000.tar, a/001.tar,
    a/002.tar (zero padding kept); '{x,y}' lists alternatives; several groups multiply."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    items = [str(i).zfill(len(r.group(1))) for i in range(int(r.group(1)), int(r.group(2)) + 1)] if r \
        else m.group(1).split(",")
    return [p for item in items for p in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


def find_sources(spec):
    """Sorted paths of the image files and .tar shards that --data names: a folder (searched recursively,
    following symbolic links but visiting each real folder once, since a link to a parent would otherwise
    loop until the path length limit), one .tar file, or a brace pattern of shards."""
    if "{" in spec or spec.endswith(".tar"):
        paths = expand_braces(spec)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"--data {spec!r}: {len(missing)} of its {len(paths)} shards do not exist "
                             f"(first: {missing[0]!r})")
        return sorted(paths)
    if not os.path.isdir(spec):
        raise ValueError(f"--data {spec!r} is not a folder, a .tar shard or a shard pattern like 'shards/{{000..099}}.tar'")
    paths, seen = [], set()
    for root, dirs, names in os.walk(spec, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []  # already walked under another name
            continue
        seen.add(real)
        dirs.sort()
        paths += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS + (".tar",))]
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) or .tar shards found under {spec!r}")
    return sorted(paths)


def stat_sources(paths):
    """[path, size, mtime_ns] of each source: what decides whether a remembered scan of it still holds."""
    return [[p, st.st_size, st.st_mtime_ns] for p in paths for st in [os.stat(p)]]


def _readable(ref):
    """Whether PIL can parse the image's header (and a PNG's checksums) without decoding the pixels."""
    try:
        with Image.open(ref.open()) as im:
            im.verify()
        return True
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError...) for a bad file
        return False


def scan_source(stat):
    """One source ([path, size, mtime_ns]) -> its manifest entry: the stat plus "images", the [member,
    offset, size] of each readable image ("" member: the file itself), and "bad", what was not readable.
    A shard is opened as plain (uncompressed) tar, since its members are later read at their offsets."""
    path = stat[0]
    if not path.endswith(".tar"):
        good = _readable(ImageRef(path))
        return {"source": stat, "images": [["", 0, -1]] if good else [], "bad": [] if good else [path]}
    images, bad = [], []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:  # reads member headers, seeking past the data
                if not (m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS)):
                    continue
                if _readable(ImageRef(path, m.name, m.offset_data, m.size)):
                    images.append([m.name, m.offset_data, m.size])
                else:
                    bad.append(f"{path}:{m.name}")
    except (tarfile.TarError, OSError) as e:
        bad.append(f"{path} (not an uncompressed tar file: {e})")
    return {"source": stat, "images": images, "bad": bad}


def images_of(entries):
    """Manifest entries -> (ImageRefs, names of bad images). Raises if there is no readable image."""
    refs = [ImageRef(e["source"][0], *im) for e in entries for im in e["images"]]
    bad = [b for e in entries for b in e["bad"]]
    if not refs:
        raise ValueError(f"none of the {len(bad)} images could be read (first: {bad[0]!r})" if bad else "no images found")
    return refs, bad


def readable_images(spec):
    """All readable images of a folder, shard or shard pattern, scanned in this process: -> (refs, bad)."""
    return images_of([scan_source(s) for s in stat_sources(find_sources(spec))])


def read_manifest(path):
    """{source path: entry} remembered in a manifest file; {} if there is none or it can not be read."""
    try:
        with open(path) as f:
            return {e["source"][0]: e for e in json.load(f)["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_manifest(path, entries):
    write_atomically(path, lambda f: f.write(json.dumps({"entries": entries}).encode()))


def open_rgb(file):
    """An image (a path, a file object or an ImageRef) -> an 8-bit RGB PIL image, upright (EXIF orientation
    applied), transparency on white."""
    with Image.open(file.open() if isinstance(file, ImageRef) else file) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale: 65535 is white, as in the file
            a = np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)
            im = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
        if im.mode == "P" or "A" in im.mode:  # palette or alpha: composite onto white
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return im.convert("RGB")


def stable_seed(*parts):
    """A 63-bit seed from integers and strings, the same in every process and Python session (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class ImageFolder(Dataset):
    """Square crops of images as (3, S, S) tensors in [-1, 1].

    Indexed with an int: a center crop (evaluation, caches, grids). Indexed with (i, epoch): a random crop,
    flip and, with hue_jitter > 0, a hue rotation by up to +-hue_jitter of the colour wheel, all drawn from
    a generator seeded by (seed, epoch, i), so an image's augmentation does not depend on which process or
    worker loads it. That is what makes 2 processes equal 1, and a resumed run equal an uninterrupted one."""

    def __init__(self, images, image_size, seed=0, hue_jitter=0.0):
        self.images, self.size, self.seed, self.hue_jitter = images, image_size, seed, hue_jitter  # ImageRefs
        self.resize = transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        i, epoch = item if isinstance(item, tuple) else (item, None)
        for attempt in range(len(self.images)):  # an image that passed the header check but will not decode
            ref = self.images[(i + attempt) % len(self.images)]
            try:
                image = self.resize(open_rgb(ref))  # shorter side = size
                break
            except Exception as e:
                warnings.warn(f"skipping {ref}: {e}")
        else:
            raise ValueError("no image could be decoded")
        W, H = image.size
        left, top, flip, hue = (W - self.size) // 2, (H - self.size) // 2, False, 0.0
        if epoch is not None:
            g = torch.Generator().manual_seed(stable_seed(self.seed, epoch, i))
            left, top = (int(torch.randint(d - self.size + 1, (), generator=g)) for d in (W, H))
            flip = bool(torch.randint(2, (), generator=g))
            hue = (2 * float(torch.rand((), generator=g)) - 1) * self.hue_jitter
        image = image.crop((left, top, left + self.size, top + self.size))
        x = self.to_tensor(transforms.functional.adjust_hue(image, hue) if hue else image)  # (3, S, S)
        return x.flip(-1) if flip else x


@functools.lru_cache(maxsize=4)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed(seed, epoch)))


def batch_indices(n, per_rank, rank, world, seed, step):
    """This process's item indices for optimizer step `step` (0-based), and the epoch.

    Every epoch is a fresh permutation of the n items, seeded by (seed, epoch), cut into global batches of
    per_rank * world items (the remainder is dropped, so no item is seen twice in an epoch); rank r takes
    the r-th contiguous chunk of each. So the data of step s is a function of s alone: 2 processes with
    batch b see exactly what 1 process with batch 2b sees, and resuming at step s needs only s."""
    per_step = per_rank * world
    epoch, k = divmod(step, n // per_step)
    start = k * per_step + rank * per_rank
    return epoch_permutation(n, seed, epoch)[start:start + per_rank].tolist(), epoch


class StepSampler(Sampler):
    """Feeds a DataLoader the (index, epoch) pairs of batch_indices, from `start_step` on, forever."""

    def __init__(self, n, per_rank, rank, world, seed, start_step):
        self.args, self.start_step = (n, per_rank, rank, world, seed), start_step

    def __iter__(self):
        step = self.start_step
        while True:
            indices, epoch = batch_indices(*self.args, step)
            yield from ((i, epoch) for i in indices)
            step += 1


# -----------------------------------------------------------------------------------------------------------
# Checkpoints.


class WriteError(OSError):
    """A file could not be written (a full disk, a file size limit, an I/O error): the message names the file,
    its folder and the free space left there. The previous version of the file, if any, is untouched."""


class _RecordingFile:
    """A file object that remembers the first OSError its writes raised: torch.save reports a failed write
    as a RuntimeError with no errno, so the cause is read back from here."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):  # flush, tell, seek...: the real file's
        return getattr(self.f, name)


def fsync_folder(folder):
    """Make a rename in `folder` durable: a directory's entries reach the disk only when it is synced."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, write):
    """write(f) into a temp file in the same folder, sync it to the disk, rename it into place, then sync the
    folder. So a file that exists is complete and on the disk, even after a power cut right after the call
    returns, and a crash mid-write never leaves a truncated file where a good one was. A failed write (the
    disk full, a size limit, an I/O error) removes the temp file, leaves any previous file as it was, and
    raises WriteError naming the file, the folder and the space left."""
    tmp, folder = path + ".tmp", os.path.dirname(path) or "."
    f = None
    try:
        with open(tmp, "wb") as raw:
            f = _RecordingFile(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        fsync_folder(folder)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass  # the disk that failed the write may fail this too; the temp file is harmless
        cause = (f.error if f is not None else None) or e
        if not isinstance(cause, OSError):
            raise  # a bug, not the disk: let it show as one
        free = shutil.disk_usage(folder).free / 1e6 if os.path.isdir(folder) else float("nan")
        error = WriteError(f"could not write {path} ({cause.strerror or cause}); {free:,.0f} MB free in {folder}")
        error.errno = cause.errno
        raise error from None


def save_checkpoint(obj, path):
    write_atomically(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, kind):
    """torch.load with weights_only=True (a checkpoint can never run code), and clear errors for a missing,
    unreadable or wrong kind of file. `kind` is "vqgan" or "prior" (what train.py writes)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {kind} checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a pickle with code in it...
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        raise ValueError(f"{path} is not a {kind} checkpoint written by train.py")
    return ckpt


# -----------------------------------------------------------------------------------------------------------
# Stage 2's cache: every image's VQGAN tokens and CLIP embedding, too large at ImageNet scale for every process
# to hold a copy of. It is a folder of chunk files of consecutive images (and their mirror images), tokens
# in the smallest integer type the codebook fits, embeddings in fp16, memory-mapped when read. Processes
# encode the chunks round-robin and write each one when it is complete, so a killed build keeps its finished
# chunks. Chunk boundaries depend on the number of images alone, so the cache's bytes do not depend on how
# many processes built it. (Its key and its build need the models: train.py.)

CACHE_CHUNKS = 64  # about this many chunks, so that up to 64 processes share the encoding...
CACHE_CHUNK_MAX = 4096  # ...but no more images than this per chunk (a killed build loses at most that)


def cache_chunk_size(n_images):
    return min(CACHE_CHUNK_MAX, math.ceil(n_images / CACHE_CHUNKS))


def cache_chunks(n_images):
    """The image indices of each cache chunk: consecutive ranges of cache_chunk_size images."""
    size = cache_chunk_size(n_images)
    return [range(start, min(start + size, n_images)) for start in range(0, n_images, size)]


def cache_file(folder, kind, chunk):
    """The file of one chunk; kind is "tokens" or "embeddings"."""
    return os.path.join(folder, f"{kind}_{chunk:05d}.npy")


def save_npy(array, path):
    write_atomically(path, lambda f: np.save(f, array))


class ChunkedArray:
    """The rows of several .npy files, in order, indexed as one array. Memory-mapped: a lookup reads only
    its rows, and the processes of a node share one copy in the page cache instead of holding one each."""

    def __init__(self, paths):
        self.parts = [np.load(p, mmap_mode="r") for p in paths]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])  # first row of each part, then the total

    def __len__(self):
        return int(self.starts[-1])

    @property
    def shape(self):
        return (len(self), *self.parts[0].shape[1:])

    def mean_of_unit_rows(self, n_rows):
        """The mean of the first n_rows rows, each scaled to unit length, (D,) float32, one file at a time."""
        total = 0
        for start, part in zip(self.starts, self.parts):
            total = total + F.normalize(torch.from_numpy(part[:max(0, n_rows - start)].astype(np.float32)), dim=-1).sum(0)
        return total / n_rows

    def __getitem__(self, rows):
        """rows (a sequence of ints) -> an ndarray (len(rows), ...) copied out of the files."""
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows),) + self.parts[0].shape[1:], self.parts[0].dtype)
        for k in np.unique(part):  # at most one pass per file the rows fall in
            out[part == k] = self.parts[k][rows[part == k] - self.starts[k]]
        return out


def open_cache(folder, n_images):
    """The cache of n_images images in `folder` -> (tokens, embeddings) ChunkedArrays of 2 * n_images rows."""
    n_chunks = len(cache_chunks(n_images))
    return tuple(ChunkedArray([cache_file(folder, kind, c) for c in range(n_chunks)])
                 for kind in ("tokens", "embeddings"))


def read_rows(array, rows):
    """Rows of a cache array as a tensor: token ids as int64 (what nn.Embedding takes), embeddings as fp32."""
    out = array[rows]
    return torch.from_numpy(out.astype(np.float32 if out.dtype == np.float16 else np.int64))


HOLDOUT_IMAGES = 4  # images kept out of stage-2 training, shown in its grids (at most a fifth of the images)


def cache_rows_per_image(hue_copies=0):
    """Rows of the stage-2 cache per image: the image and its mirror image, and the same for each hue copy."""
    return 2 * (1 + hue_copies)


def holdout_count(n_images):
    """How many of the last images stage 2 never trains on: HOLDOUT_IMAGES, at most a fifth of them."""
    return min(HOLDOUT_IMAGES, n_images // 5)


def held_out_preview(images, embeddings, image_size, hue_copies=0):
    """The held-out images (holdout_count) -> (their center crops (n, 3, S, S), their CLIP embeddings
    (n, clip_dim) from the cache, whose row r i is image i's, with r = cache_rows_per_image). A data set too
    small to spare any shows training images."""
    n_holdout = holdout_count(len(images))
    ids = range(len(images) - n_holdout, len(images)) if n_holdout else range(min(HOLDOUT_IMAGES, len(images)))
    preview = torch.stack([ImageFolder(images, image_size)[i] for i in ids])
    return preview, read_rows(embeddings, [cache_rows_per_image(hue_copies) * i for i in ids])
