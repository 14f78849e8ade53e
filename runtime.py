"""
runtime.py: the plumbing of a training run, so that train.py can tell the story of the two stages.

  - command-line types shared by the scripts, which refuse a bad value naming its flag;
  - mixed precision (--precision): one autocast helper for training, sampling and benchmarks;
  - processes: this process's rank, world size and device (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK),
    DDP wrapping, and the few collectives the loops need (broadcast, gather, mean over ranks);
  - one run per folder (an OS lock), and the faults a long run meets turned into one line each: out of
    memory, a dead process under torchrun, a full disk (every write is synced before older files go);
  - the data scan: which images --data names, checked once and remembered in OUT/manifest.json;
  - stage 2's cache of every image's tokens and embedding: its key, and its build over the processes;
  - checkpoints: written atomically, the newest K kept, the newest readable one found on --resume, and a
    resume refused when its flags would build another model or feed the data in another order;
  - random states, signals (SIGTERM, Ctrl-C) and the NaN guard, which make a resumed run equal an
    uninterrupted one and stop a run without losing or corrupting a checkpoint;
  - progress lines and the sample grids each stage writes beside its checkpoints.

Each function takes the values it reads, not train.py's whole command line. Errors a user can act on end
the run through `fail`: one `error:` line on stderr, exit status 1.
"""
import argparse
import datetime
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.functional as TF
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision.utils import save_image

import clip_loader
import data


# -----------------------------------------------------------------------------------------------------------
# The command lines of the scripts: argparse types that check a value where its flag is defined, so that a
# bad value is refused in one line naming the flag ("argument --batch-size: must be at least 1 (got 0)").


def _number(text, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None


def at_least(low):
    """A flag's type: a number >= low, an integer if `low` is one."""
    def parse(text):
        value = _number(text, type(low))
        if not value >= low:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {text})" if low else
                                             f"must not be negative (got {text})")
        return value
    return parse


def positive(text):
    """A flag's type: a number > 0."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {text})")
    return value


def between(low, high, low_open=False, high_open=False):
    """A flag's type: a number in [low, high]; an open end excludes its bound."""
    def parse(text):
        value = _number(text, float)
        above = low < value if low_open else low <= value
        below = value < high if high_open else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}"
                                             f"{')' if high_open else ']'} (got {text})")
        return value
    return parse


def folder(text):
    """A flag's type: a folder, or a path where one can be made (never an existing file)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; name a folder")
    return text


def existing_file(text):
    """A flag's type: a path to an existing file, checked before any model is loaded."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file {text!r}")
    return text


def device_name(text):
    """A flag's type: 'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default after its text, where there is one to show: a default of None (the
    text says what leaving the flag out means) or False (a switch) is not repeated as "(default: None)"."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def fail(message):
    """A run that can not proceed: one line on stderr, exit status 1 (2 is for a bad command line)."""
    sys.exit(f"error: {message}")


def millions(model):
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}"


# -----------------------------------------------------------------------------------------------------------
# Processes and devices. Under torchrun every process runs all of train.py on its share of each batch, and
# the processes meet in collective calls; rank 0 alone prints and writes files. One process is the same code
# with a world size of 1, where every collective below returns at once.


# Mixed precision, one choice for training, sampling and benchmarks (--precision). Under autocast, matmuls and
# convolutions run in the low-precision type and reductions, norms and losses in fp32; the weights and the
# optimizer stay fp32. fp16's narrow range needs the losses scaled up before backward (a gradient scaler)
# so that small gradients do not flush to zero; bf16 has fp32's range and needs none.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)  # what a step takes outside fp16: scale, step, update pass through


def resolve_precision(choice, device):
    """--precision -> "fp32", "bf16" or "fp16". auto: bf16 on a GPU that has it (Ampere and later), fp16 on
    one that does not (V100, T4), fp32 on a CPU, where autocast saves little and costs accuracy."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device, precision):
    """The autocast context of a resolved precision (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=LOW_PRECISION.get(precision), enabled=precision != "fp32")


@dataclass
class Process:
    """This process: its rank among `world` processes, its device and its precision (resolved)."""
    rank: int
    world: int
    device: torch.device
    precision: str = "fp32"

    @property
    def master(self):
        return self.rank == 0  # the one process that prints and writes files

    def autocast(self):
        return autocast(self.device, self.precision)

    def grad_scaler(self):
        """A gradient scaler for fp16 (losses scaled up before backward, gradients down before the step, a step
        skipped when they overflow); a pass-through otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def setup_distributed(device_arg, precision="auto"):
    """--device ('auto', 'cpu', 'cuda', 'cuda:N') and --precision -> Process. NCCL between GPUs, gloo between
    CPU processes."""
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device_arg} but no CUDA device is available; use --device cpu")
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    index = int(device_arg.split(":")[1]) if ":" in device_arg else int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{index}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        # TF32 matmuls and convolutions: fp32 math at about twice the speed on Ampere and later, with a
        # bf16-like mantissa.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu" and precision == "fp16":
        fail("--precision fp16 is for GPUs; on a CPU use bf16 or fp32")
    if world > 1:
        # A collective that waits longer than this for a peer (a hung process; a dead one is noticed at once)
        # fails, and the run stops with one line instead of hanging. Long enough for the slowest share of
        # the stage-2 cache build, which the other processes wait for.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Process(rank, world, device, resolve_precision(precision, device))


def lock_run_folder(out, proc):
    """One run per folder: rank 0 takes an exclusive OS lock (flock) on OUT/.lock and writes its process id
    and host there. The kernel releases the lock when the process ends, however it ends, so no stale lock can
    remain; a second train.py into the same --out (a second launch by mistake, a scheduler's retry while
    the first still runs) stops with one line naming the holder. -> the open lock file (close() releases
    it), or None on other ranks."""
    handle, holder = None, None
    if proc.master:
        os.makedirs(out, exist_ok=True)
        handle = open(os.path.join(out, ".lock"), "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.truncate(0)
            handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
    holder = broadcast_object(holder, proc)
    if holder:
        fail(f"--out {out} is in use by another training run ({holder}); wait for it to end or stop it, or "
             f"train into another --out")
    return handle


@contextmanager
def one_run(out, proc, batch_size, grad_accum):
    """Around a whole training run: holds the run folder's lock; turns running out of GPU memory, and a
    collective whose peer died, into one line each; and on every way out releases the lock and leaves the
    process group (so that tests and notebooks can run main again)."""
    lock = None
    try:
        lock = lock_run_folder(out, proc)
        yield
    except torch.OutOfMemoryError:
        fail(f"out of memory on {proc.device} with --batch-size {batch_size}. Lower --batch-size and raise "
             f"--grad-accum as much: the global batch ({batch_size * grad_accum * proc.world}), and with it the "
             f"data order, stays the same, so --resume continues this run")
    except RuntimeError as e:
        if not is_collective_failure(e, proc):
            raise
        fail(f"another process of this run stopped or hangs ({str(e).splitlines()[0][:160]}). Continue from the "
             f"last checkpoint with --resume (torchrun --max-restarts N does it by itself)")
    finally:
        if lock is not None:
            lock.close()
        end_distributed()


def wrap_model(model, compile_model, proc, double_backward=False):
    """Optionally compile, then wrap in DDP. The caller keeps the plain module for saving. double_backward: its
    loss is differentiated twice through one graph (retain_graph=True), which compiled backward passes that
    reuse ("donate") their saved buffers forbid, so they keep them."""
    if compile_model:
        if double_backward:
            torch._functorch.config.donated_buffer = False
        model = torch.compile(model)
    if proc.world > 1:
        model = DDP(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
    return model


def sync_gradients(model, last_micro_step):
    """DDP averages gradients over processes in every backward; with gradient accumulation only the last
    micro-step's backward needs to, so the others run under no_sync (entered before their forward)."""
    return model.no_sync() if isinstance(model, DDP) and not last_micro_step else nullcontext()


def is_collective_failure(error, proc):
    """Whether a RuntimeError came from a collective whose peer died or hung: gloo raises it as a plain
    RuntimeError ("Connection closed by peer"), NCCL and timeouts as torch.distributed.DistError."""
    text = str(error)
    return proc.world > 1 and (isinstance(error, dist.DistError) or "gloo" in text or "NCCL" in text
                               or "Connection closed by peer" in text or "Connection reset by peer" in text)


def end_distributed():
    """Leave the process group, if there is one (on every exit path, so that a test can run main again)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    """Wait for every process (a no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, proc):
    """Rank 0's `obj` on every process (pickled; for set-up data, not tensors)."""
    if proc.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, proc):
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if proc.world == 1:
        return [obj]
    out = [None] * proc.world
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(values, device):
    """Average a dict of floats or scalar tensors over all processes. Reading the result waits for the GPU,
    so the loops call this on logging steps only."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in values.values()])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


# -----------------------------------------------------------------------------------------------------------
# The data scan. Checking every image header takes minutes at a million files, so each source (a file or a
# tar shard) is checked once, the checks are split over the processes, and the result is remembered in
# OUT/manifest.json by each source's size and modification time: a later or resumed run re-checks only
# what changed.


def scan_data(spec, out, proc, resume=False, accept_changes=False):
    """--data `spec` -> (ImageRefs, a fingerprint of its sources). Rank 0 lists the sources with their sizes
    and times; those the manifest in `out` does not already describe are checked, split over all processes;
    rank 0 writes the updated manifest. Unreadable images are named in one warning and left out.

    A resumed run must see the images it began with, since exact resume replays the data order: with
    `resume`, sources removed or edited since the manifest was written stop the run, naming them, and new
    sources are left out with a warning, unless `accept_changes`."""
    manifest_path = os.path.join(out, "manifest.json")
    listing = None
    if proc.master:
        try:
            listing = data.stat_sources(data.find_sources(spec))
        except ValueError as e:
            listing = str(e)
    listing = broadcast_object(listing, proc)
    if isinstance(listing, str):
        fail(listing)
    known = data.read_manifest(manifest_path)
    if resume and known and not accept_changes:
        listing = unchanged_sources(listing, known, proc)
    todo = [s for s in listing if s[0] not in known or known[s[0]]["source"] != s]
    mine = [data.scan_source(s) for s in todo[proc.rank::proc.world]]
    scanned = {e["source"][0]: e for part in gather_objects(mine, proc) for e in part}
    entries = [scanned[s[0]] if s[0] in scanned else known[s[0]] for s in listing]
    with rank0_writes(proc):
        if proc.master and (todo or len(known) != len(listing)):
            os.makedirs(out, exist_ok=True)
            data.write_manifest(manifest_path, entries)
    try:
        images, bad = data.images_of(entries)
    except ValueError as e:
        fail(f"--data {spec!r}: {e}")
    if bad and proc.master:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"warning: skipping {len(bad)} unreadable image file(s): {shown}", file=sys.stderr)
    return images, hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def unchanged_sources(listing, known, proc):
    """The sources of `listing` that the manifest `known` describes as they are; exit naming the removed or
    edited ones, if any, and warn of new ones, which are left out."""
    here = {s[0] for s in listing}
    removed = [path for path in known if path not in here]
    edited = [s[0] for s in listing if s[0] in known and known[s[0]]["source"] != s]
    named = lambda paths: ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    if removed or edited:
        what = [f"{len(removed)} removed ({named(removed)})"] * bool(removed) + \
            [f"{len(edited)} edited ({named(edited)})"] * bool(edited)
        fail(f"--data changed since this run began: {' and '.join(what)}. --resume replays the run's data order, "
             f"which needs the same images: put them back, or pass --accept-changed-data to go on with the data "
             f"as it is (the order changes from here on)")
    added = [s[0] for s in listing if s[0] not in known]
    if added and proc.master:
        print(f"warning: {len(added)} source(s) added to --data since this run began are left out of it "
              f"({named(added)}); --accept-changed-data trains on them (the order changes from here on)",
              file=sys.stderr)
    return [s for s in listing if s[0] in known]


# -----------------------------------------------------------------------------------------------------------
# Stage 2's cache (its files: data.py): every image's VQGAN tokens and CLIP embedding, encoded once, split
# over the processes, and then memory-mapped by all of them, so that the prior's steps never touch an image
# file. Its key names everything the cache depends on; its build runs the frozen models.

CACHE_BATCH = 32  # images per encoder batch (x2 with the mirror images); fixed, so the cache's bytes are too


def clip_sha256(name):
    """The identity of the CLIP --clip names: a released model's SHA-256 from its URL (what its download is
    checked against), a file's by reading it. Checkpoints record it, so that a run is never continued with
    another CLIP, whatever its name or path."""
    return clip_loader.MODELS[name].split("/")[0] if name in clip_loader.MODELS else clip_loader.sha256_of(name)


def cache_key(fingerprint, vqgan_sha256, clip_sha, image_size, hue_copies=0):
    """A digest of everything the cached tokens and embeddings depend on: the images (scan_data's
    fingerprint of the sources' paths, sizes and times), the VQGAN weights and the CLIP (their SHA-256), the
    image size, the chunking and the hue copies. Any change gives a new key and a new cache."""
    # Without hue copies the key is what it was before they existed, so older caches stay valid.
    blob = json.dumps([fingerprint, vqgan_sha256, clip_sha, image_size, data.CACHE_CHUNKS, data.CACHE_CHUNK_MAX]
                      + ([hue_copies] if hue_copies else []))
    return hashlib.sha256(blob.encode()).hexdigest()


def hue_copies_of(x, image_ids, hue_copies):
    """(b, 3, S, S) center crops in [-1, 1] of images `image_ids` -> (b, 1 + hue_copies, 3, S, S): each crop,
    then copies of it with the hues rotated by amounts drawn once per (image, copy), anywhere on the colour
    wheel. They pair the image's shapes with colours it was never seen in, each with its own CLIP embedding."""
    copies = [x]
    for c in range(1, hue_copies + 1):
        hues = [float(torch.rand((), generator=torch.Generator().manual_seed(data.stable_seed("hue copy", i, c))))
                - 0.5 for i in image_ids]
        copies.append(torch.stack([TF.adjust_hue(im.add(1).div(2), h).mul(2).sub(1) for im, h in zip(x, hues)]))
    return torch.stack(copies, dim=1)


@torch.no_grad()
def build_cache(images, vq, clip_model, folder, proc, stop, workers=0, hue_copies=0):
    """Encode this process's missing chunks of the cache in `folder` (data.cache_chunks): per image i, rows
    r i, ..., r i + r - 1 with r = data.cache_rows_per_image(hue_copies) of VQGAN token ids and CLIP image
    embeddings: a center crop, its mirror image, then each hue copy and its mirror image. DataLoader workers
    decode the images in parallel. A signal (`stop`) ends the build between batches; finished chunks stay,
    the one in progress is dropped, and the next run encodes only the rest."""
    os.makedirs(folder, exist_ok=True)
    dataset = data.ImageFolder(images, vq.cfg.image_size)
    token_dtype = np.uint16 if vq.cfg.codebook_size <= 1 << 16 else np.int32
    chunks = data.cache_chunks(len(images))
    mine = [c for c in range(proc.rank, len(chunks), proc.world)
            if not os.path.exists(data.cache_file(folder, "tokens", c))]
    # Encoder batches never straddle chunks, so each chunk is encoded the same way whoever encodes it.
    batches = [(c, list(chunks[c][i:i + CACHE_BATCH])) for c in mine for i in range(0, len(chunks[c]), CACHE_BATCH)]
    loader = DataLoader(dataset, batch_sampler=[b for _, b in batches], num_workers=workers)
    tokens, embeddings = [], []
    for (chunk, batch), x in zip(batches, loader):
        if stop.signal is not None:
            print(f"stopped by signal {stop.signal} while encoding images for stage 2; finished cache chunks are "
                  f"kept in {folder}, and the next run encodes only the rest")
            sys.exit(128 + stop.signal)
        x = hue_copies_of(x, batch, hue_copies)  # (b, copies, 3, S, S)
        x = torch.stack([x, x.flip(-1)], dim=2).flatten(0, 2).to(proc.device)  # (b * r, 3, S, S), image by image
        tokens.append(vq.encode(x).flatten(1).cpu().numpy().astype(token_dtype))  # (b * r, h*w)
        clip_in = clip_loader.preprocess_tensor(x, clip_model.arch.image_resolution)
        embeddings.append(clip_model.encode_image(clip_in).float().cpu().numpy().astype(np.float16))  # (b * r, clip_dim)
        if batch[-1] == chunks[chunk][-1]:  # the chunk is complete
            data.save_npy(np.concatenate(embeddings), data.cache_file(folder, "embeddings", chunk))
            data.save_npy(np.concatenate(tokens), data.cache_file(folder, "tokens", chunk))  # last: marks it done
            tokens, embeddings = [], []


def cached_tokens_and_embeddings(images, fingerprint, vq, vqgan_sha256, clip_model, clip_sha, out, workers, stop,
                                 proc, hue_copies=0):
    """The cache of these images in OUT/prior_cache_KEY, built where chunks are missing -> (tokens,
    embeddings) ChunkedArrays of data.cache_rows_per_image(hue_copies) rows per image."""
    key = cache_key(fingerprint, vqgan_sha256, clip_sha, vq.cfg.image_size, hue_copies)
    folder = os.path.join(out, "prior_cache_" + key[:16])
    n_chunks = len(data.cache_chunks(len(images)))
    missing = sum(not os.path.exists(data.cache_file(folder, "tokens", c)) for c in range(n_chunks))
    if proc.master and missing:
        copies = f", {hue_copies} hue copies of each" if hue_copies else ""
        print(f"encoding {len(images)} images (and their mirror images{copies}) with the VQGAN and CLIP in {proc.world} "
              f"process(es): {missing} of {n_chunks} cache chunks to write in {folder}")
        stale = [os.path.join(out, f) for f in os.listdir(out) if f.startswith("prior_cache_") and
                 os.path.join(out, f) != folder]
        if stale:  # other images, VQGAN or CLIP: no run of this folder reads them any more
            size = sum(os.path.getsize(os.path.join(f, c)) for f in stale for c in os.listdir(f)) / 1e6
            print(f"warning: {len(stale)} older stage-2 cache(s) in {out} take {size:,.0f} MB and are no longer "
                  f"used: {', '.join(os.path.basename(f) for f in stale)}; delete them to free the space",
                  file=sys.stderr)
    elif proc.master:
        print(f"using cached tokens and embeddings in {folder}")
    try:
        build_cache(images, vq, clip_model, folder, proc, stop, workers, hue_copies)
        error = None
    except data.WriteError as e:
        error = str(e)
    # Each process waits only for the others' share of the chunks, and hears if one of them could not write.
    errors = [e for e in gather_objects(error, proc) if e]
    if errors:
        fail(f"{errors[0]}. Finished cache chunks are kept: make room, then run again (or --resume)")
    return data.open_cache(folder, len(images))


# -----------------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, the last K kept, everything needed to continue exactly.


@contextmanager
def rank0_writes(proc):
    """Around what rank 0 alone writes (checkpoints, grids, the manifest): a write that fails (a full disk)
    stops every process with one line, instead of rank 0 alone while the others wait for it in the next
    collective until the timeout."""
    error = None
    try:
        yield
    except OSError as e:
        error = str(e) if isinstance(e, data.WriteError) else f"{e.strerror or e}: {e.filename}"
    error = broadcast_object(error, proc)
    if error:
        fail(f"{error}. Every file written before is kept: make room, then continue with --resume")


def save_rotating(obj, out, kind, step, keep):
    """Write OUT/checkpoints/KIND_STEP.pt, point OUT/KIND.pt (what sample.py loads) at it, and only then delete
    all but the newest `keep` step files: each write is on the disk (synced, renamed, its folder synced)
    before anything older goes, so a power cut never leaves the run without a readable checkpoint."""
    write_and_link(obj, out, kind, step)
    folder = os.path.join(out, "checkpoints")
    for old in sorted(f for f in os.listdir(folder) if f.startswith(kind + "_"))[:-keep]:
        os.remove(os.path.join(folder, old))


def save_checkpoint(ckpt, out, kind, step, keep, proc, draw_grid):
    """Rank 0 writes the checkpoint (save_rotating), then its sample grid with draw_grid(OUT/KIND_STEP.png);
    a failed write stops every process (rank0_writes). -> OUT/KIND.pt, now the newest readable checkpoint."""
    with rank0_writes(proc):
        if proc.master:
            save_rotating(ckpt, out, kind, step, keep)
            draw_grid(os.path.join(out, f"{kind}_{step:07d}.png"))
    return os.path.join(out, f"{kind}.pt")


def write_and_link(obj, out, kind, step):
    """OUT/checkpoints/KIND_STEP.pt, then OUT/KIND.pt made the same file by an atomic hard link (a copy on file
    systems without hard links), durable before this returns."""
    folder = os.path.join(out, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{kind}_{step:07d}.pt")
    data.save_checkpoint(obj, path)
    tmp = os.path.join(out, f".{kind}.pt.link")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links here: a second copy, written like any other file
        with open(path, "rb") as src:
            data.write_atomically(tmp, lambda f: shutil.copyfileobj(src, f))
    os.replace(tmp, os.path.join(out, f"{kind}.pt"))
    data.fsync_folder(out)


def latest_checkpoint(out, kind, proc):
    """The newest readable checkpoint of `kind` in `out` and its path, else (None, None). A truncated or
    corrupt newest file (a crash, a full disk) falls back to the previous one, with a warning."""
    folder = os.path.join(out, "checkpoints")
    history = sorted((f for f in os.listdir(folder) if f.startswith(kind + "_")), reverse=True) \
        if os.path.isdir(folder) else []
    candidates = [p for p in [os.path.join(out, f"{kind}.pt")] + [os.path.join(folder, f) for f in history]
                  if os.path.exists(p)]
    for path in candidates:
        try:
            return data.load_checkpoint(path, kind), path
        except ValueError as e:
            if proc.master:
                print(f"warning: {e}; trying an older checkpoint", file=sys.stderr)
    if candidates:  # training from step 0 would overwrite them: leave them for the user to inspect
        fail(f"--resume: none of the {len(candidates)} {kind} checkpoint(s) in {out} could be read; move "
             f"them away to train {kind} from scratch")
    if proc.master:
        print(f"--resume: no {kind} checkpoint in {out} yet; training {kind} from step 0")
    return None, None


def checkpoint(kind, cfg, step, batch, args, proc, **state):
    """A self-describing checkpoint: what was trained (kind, the model's config dataclass, the arguments), how
    far (the step; the global batch, which decides the data order; every process's random state, with the
    values in state["rng_extra"]) and `state` itself (weights, optimizers, ...)."""
    rng = gather_process_states(proc, **state.pop("rng_extra", {}))
    return {"kind": kind, "config": asdict(cfg), **state, "step": step, "global_batch": batch, "rng": rng,
            "args": vars(args)}


# Config fields that a flag other than --preset decides.
FLAG_OF_FIELD = {"image_size": "--image-size", "adaln": "--adaln", "clip_dim": "--clip", "remove_mean": "--remove-mean",
                 "n_layer": "--prior-layers", "n_embd": "--prior-width", "n_head": "--prior-width",
                 "embed_head": "--embed-pred-weight"}


def refuse_changed_run(ckpt, ckpt_path, config, prior_type, preset, seed, global_batch, clip=(None, None),
                       data_fingerprint=None, hue_copies=None):
    """Exit, naming the flag, if resuming with these values would build another model than the checkpoint's
    (`config`, the model config the flags give, as a dict), feed other data or the data in another order (its
    fingerprint, None once the user accepted a change; the seed, the global batch) or condition the prior on
    another CLIP (`clip`: --clip and its SHA-256, or Nones where the run uses none); anything else may change
    on resume."""
    saved = ckpt["args"]
    refuse_other_clip(saved, ckpt_path, *clip)
    if data_fingerprint is not None and saved.get("data_fingerprint") not in (None, data_fingerprint):
        fail(f"--data is not the data {ckpt_path} was trained on (OUT/manifest.json, which would say what changed, "
             f"no longer describes it); restore it, or pass --accept-changed-data to go on with the data as it is")
    saved_prior = saved.get("prior", "ar")  # runs from before --prior existed trained the GPT
    if saved_prior != prior_type:
        fail(f"--prior {prior_type} but {ckpt_path} holds a --prior {saved_prior} run; resume with "
             f"--prior {saved_prior}, or train the other prior into another --out")
    if saved["preset"] != preset:
        fail(f"--preset {preset} but {ckpt_path} was trained with --preset {saved['preset']}; resume with "
             f"the same preset, or start a new run in another --out")
    for field, value in ckpt["config"].items():
        if json.dumps(value) != json.dumps(config[field]):  # tuples come back as tuples or lists
            flag = FLAG_OF_FIELD.get(field, "--preset")
            fail(f"{flag} gives {field} = {config[field]} but {ckpt_path} was trained with {value}; resume with "
                 f"the flags it was trained with, or start a new run in another --out")
    if saved["seed"] != seed:
        fail(f"--seed {seed} but {ckpt_path} was trained with --seed {saved['seed']}, which decides the "
             f"data order; resume with --seed {saved['seed']}")
    if ckpt["global_batch"] != global_batch:
        fail(f"--batch-size x --grad-accum x processes = {global_batch}, but {ckpt_path} was trained with a "
             f"global batch of {ckpt['global_batch']}, which decides the data order; keep that product")
    if hue_copies is not None and saved.get("hue_copies", 0) != hue_copies:
        fail(f"--hue-copies {hue_copies} but {ckpt_path} was trained with --hue-copies {saved.get('hue_copies', 0)}, "
             f"which decides the training rows; resume with --hue-copies {saved.get('hue_copies', 0)}")


def refuse_other_clip(saved_args, ckpt_path, name, sha):
    """Exit, naming both, if the checkpoint's run was begun with another CLIP than --clip `name` (SHA-256
    `sha`). Runs from before CLIPs were recorded, stage-1 runs that name none, and bundled VQGANs (no args) pass."""
    saved_name, saved_sha = saved_args.get("clip"), saved_args.get("clip_sha256")
    if sha is not None and saved_sha is not None and saved_sha != sha:
        fail(f"--clip {name} (SHA-256 {sha[:12]}...) is not the CLIP {ckpt_path} was trained with, --clip "
             f"{saved_name} (SHA-256 {saved_sha[:12]}...): its embeddings would mean something else. Pass that CLIP, "
             f"or train into another --out")


# -----------------------------------------------------------------------------------------------------------
# Random states. The data and the draws of a step are functions of the step (data.batch_indices), so what a
# resume needs besides the step is each process's torch generator (dropout, the VQGAN's dead-code restarts).


def gather_process_states(proc, **extra):
    """Every process's torch (and CUDA) random state plus `extra` values, gathered so rank 0 can save them."""
    state = {"torch": torch.get_rng_state(), **extra}
    if proc.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(proc.device)
    if not dist.is_initialized():
        return [state]
    states = [None] * proc.world
    dist.all_gather_object(states, state)
    return states


def restore_process_state(states, proc):
    """Restore this process's random state from a checkpoint; returns its saved dict (with any extras)."""
    if len(states) != proc.world:
        print("warning: the checkpoint was written with another number of processes; random streams restart",
              file=sys.stderr)
        return {}
    torch.set_rng_state(states[proc.rank]["torch"])
    if proc.device.type == "cuda" and "cuda" in states[proc.rank]:
        torch.cuda.set_rng_state(states[proc.rank]["cuda"], proc.device)
    return states[proc.rank]


# -----------------------------------------------------------------------------------------------------------
# The loop's companions: signals, non-finite losses, progress lines and sample grids.


class GracefulStop:
    """SIGTERM (a scheduler pre-empting the job) or Ctrl-C sets a flag; the loop finishes its step, saves
    a checkpoint and exits. Under DDP all ranks must agree on the step at which they stop, so the flag is
    OR-reduced over ranks every `every` steps (a device round trip we do not want on every step)."""

    def __init__(self, every=10):
        self.signal, self.every = None, every
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum

    def requested(self, step, device):
        if not dist.is_initialized():
            return self.signal is not None
        if step % self.every:
            return False
        flag = torch.tensor(float(self.signal is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal is None:
            self.signal = signal.SIGTERM
        return bool(flag.item())

    def exit(self, step, proc):
        if proc.master:
            print(f"stopped by signal {self.signal} after step {step}; checkpoint saved, continue with --resume")
        sys.exit(128 + self.signal)


class NonFiniteGuard:
    """Remembers, on the device and without waiting for it, the first step whose loss was NaN or inf;
    `check` (called before logging and saving) stops the run naming that step, so no checkpoint is ever
    written from a diverged model."""

    NONE = 1 << 62  # "no bad step": larger than any step, so a MIN over ranks finds the first bad one

    def __init__(self, device, last_good=None):
        self.first_bad = torch.full((), self.NONE, dtype=torch.long, device=device)
        self.last_good = last_good  # path of the newest checkpoint written from finite losses

    def update(self, loss, step):
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad == self.NONE)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self):
        first_bad = self.first_bad.clone()
        if dist.is_initialized():
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        if first_bad.item() != self.NONE:
            fail(f"the loss became NaN/inf at step {first_bad.item()}; stopping without saving. The last good "
                 f"checkpoint is {self.last_good or 'none (no checkpoint yet)'}: resume from it with --resume "
                 f"and a lower learning rate.")


class Meter:
    """Throughput since the last call and the time left, for progress lines."""

    def __init__(self, start):
        self.t0 = self.last = time.time()
        self.start = self.last_step = start

    def rate(self, step, units_per_step):
        now = time.time()
        rate = (step - self.last_step) * units_per_step / max(now - self.last, 1e-9)
        self.last, self.last_step = now, step
        return rate

    def eta(self, step, total):
        seconds = (time.time() - self.t0) / max(step - self.start, 1) * (total - step)
        return time.strftime("%H:%M:%S", time.gmtime(seconds))


def save_grid(top, bottom, path):
    """Two rows of images in [-1, 1], (n, 3, H, W) each, as one PNG, written like a checkpoint."""
    data.write_atomically(path, lambda f: save_image(torch.cat([top, bottom]) * 0.5 + 0.5, f, nrow=len(top),
                                                     format="png"))


@torch.no_grad()
def save_vqgan_grid(model, preview, path, device):
    """Stage 1's visual log: training images (center crops) over their reconstructions."""
    model.eval()  # in train mode the quantizer would count the preview as codebook use
    recon = model(preview.to(device))[0].float().clamp(-1, 1).cpu()
    model.train()
    save_grid(preview, recon, path)


@torch.no_grad()
def save_prior_grid(model, vq, preview, preview_emb, path, seed, proc):
    """Stage 2's visual log: held-out images over the prior's samples from their CLIP image
    embeddings (the seed fixed, so that grids of successive checkpoints compare)."""
    model.eval()
    with proc.autocast():
        samples = model.sample(preview_emb.to(proc.device), temperature=1.0, top_k=100,
                               generator=torch.Generator(proc.device).manual_seed(seed))
        side = math.isqrt(model.cfg.n_tokens)
        images = vq.decode(samples.view(-1, side, side)).float().clamp(-1, 1).cpu()
    model.train()
    save_grid(preview, images, path)
