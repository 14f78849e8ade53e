"""
data.py: the files clipgen reads and writes, shared by training and inference: image folders (discovery,
robust RGB loading, augmentation, the step-indexed sampler that makes runs reproducible) and checkpoints
(atomic writes, loading that never runs pickled code, file hashes).

Everything here raises exceptions (ValueError, OSError) with a message a user can act on; the scripts turn
them into one `error:` line. Nothing here calls sys.exit, so library code (clipgen.CLIPGen) can use it.

    paths, bad = readable_images(find_images("imgs/"))
    x = ImageFolder(paths, 64)[0]                  # (3, 64, 64) center crop in [-1, 1]
"""
import functools
import hashlib
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler
from torchvision import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# -----------------------------------------------------------------------------------------------------------
# Image folders. A run should never die hours in because of one bad file, nor silently train on fewer images
# than the user thinks: bad files are dropped up front (and named by the caller), and a file that only fails
# when decoded is replaced by the next one.


def find_images(folder):
    """Sorted paths of all images under `folder`, recursively, following symbolic links but visiting each
    real folder once (a link to a parent would otherwise loop until the path length limit)."""
    if not os.path.isdir(folder):
        raise ValueError(f"--data {folder!r} is not a folder")
    paths, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []  # already walked under another name
            continue
        seen.add(real)
        dirs.sort()
        paths += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder!r}")
    return sorted(paths)


def readable_images(paths):
    """-> (good, bad): the files whose headers PIL can parse, and the others. Checks headers (and PNG
    checksums) without decoding pixels, so it is fast. Raises if no file is readable."""
    good, bad = [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
            good.append(path)
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError...) for a bad file
            bad.append(path)
    if not good:
        raise ValueError(f"none of the {len(paths)} image files could be read (first: {paths[0]!r})")
    return good, bad


def open_rgb(path):
    """Any image file -> an 8-bit RGB PIL image, upright (EXIF orientation applied), transparency on white."""
    with Image.open(path) as im:
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

    Indexed with an int: a center crop (evaluation, caches, grids). Indexed with (i, epoch): a random crop
    and flip drawn from a generator seeded by (seed, epoch, i), so an image's augmentation does not depend
    on which process or worker loads it. That is what makes 2 processes equal 1, and a resumed run equal
    an uninterrupted one."""

    def __init__(self, paths, image_size, seed=0):
        self.paths, self.size, self.seed = paths, image_size, seed
        self.resize = transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        i, epoch = item if isinstance(item, tuple) else (item, None)
        for attempt in range(len(self.paths)):  # a file that passed the header check but will not decode
            path = self.paths[(i + attempt) % len(self.paths)]
            try:
                image = self.resize(open_rgb(path))  # shorter side = size
                break
            except Exception as e:
                warnings.warn(f"skipping {path}: {e}")
        else:
            raise ValueError("no image could be decoded")
        W, H = image.size
        if epoch is None:
            left, top, flip = (W - self.size) // 2, (H - self.size) // 2, False
        else:
            g = torch.Generator().manual_seed(stable_seed(self.seed, epoch, i))
            left, top = (int(torch.randint(d - self.size + 1, (), generator=g)) for d in (W, H))
            flip = bool(torch.randint(2, (), generator=g))
        x = self.to_tensor(image.crop((left, top, left + self.size, top + self.size)))  # (3, S, S)
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
# Checkpoints and file hashes.


def sha256_of(path):
    """Hex SHA-256 of a file, read in 1 MB chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(obj, path):
    """torch.save to a temp file in the same folder, then an atomic rename: a crash mid-write never
    leaves a truncated checkpoint where a good one was."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
