"""
clip_loader.py: OpenAI's CLIP (Radford et al. 2021, arXiv 2103.00020) rebuilt from scratch, loading
OpenAI's released weights. CLIP-GEN needs it twice: its image encoder gives the condition the prior is
trained on (and, made differentiable, the embedding-reconstruction loss), and its text encoder gives the
condition at inference. Everything else in clipgen stands on this file giving the same numbers as OpenAI's.

The architecture is read from the tensor shapes of the checkpoint, never from a table of known models, and
every module is named after the checkpoint's keys, so loading is a single strict `load_state_dict`.
The public API mirrors OpenAI's `clip` package:

    import clip_loader
    model, preprocess = clip_loader.load("ViT-B/32")          # or a path to a .pt file
    tokens = clip_loader.tokenize(["a dog", "a cat"])          # (2, 77) LongTensor
    logits_per_image, logits_per_text = model(preprocess(img).unsqueeze(0), tokens)

Run `python clip_loader.py ViT-B/32 photo.jpg "a dog" "a cat"` for zero-shot probabilities.
"""
import functools
import gzip
import hashlib
import html
import os
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

# -----------------------------------------------------------------------------------------------------------
# OpenAI's released checkpoints. The path segment before each file name is the file's SHA-256, which is
# what we verify a download against.

BASE_URL = "https://openaipublic.azureedge.net/clip/models/"
MODELS = {
    "RN50": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}

# OpenAI's image normalisation (the statistics of CLIP's training set), used by both preprocessing paths.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def available_models():
    """Names `load` can download."""
    return list(MODELS)


def cache_dir(download_root=None):
    """Where downloads go: the argument, else $CLIPGEN_CACHE, else ~/.cache/clipgen."""
    return download_root or os.environ.get("CLIPGEN_CACHE") or os.path.expanduser("~/.cache/clipgen")


def sha256_of(path):
    """Hex SHA-256 of a file, read in 1 MB chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, root, sha256, offline_hint=None):
    """Fetch `url` into folder `root` unless a file with the right SHA-256 is already there. `sha256` may be
    a prefix of it, as torch hub file names carry one ("...-6726825d.pth").

    The bytes go to a temp file in the same folder and are renamed into place only after the checksum
    matches, so an interrupted or corrupted download never leaves a file that looks finished. Offline, the
    error says what to do instead: `offline_hint`, or how to pass a CLIP file.
    """
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        if sha256_of(target).startswith(sha256):
            return target
        warnings.warn(f"{target} does not match its SHA-256 checksum; downloading it again")
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".download-", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if total and sys.stderr.isatty():
                    print(f"\rdownloading {url}: {done / total:6.1%}", end="", file=sys.stderr)
        if not digest.hexdigest().startswith(sha256):
            raise RuntimeError(f"downloaded {url} but its SHA-256 is {digest.hexdigest()}, expected {sha256}; "
                               "the file was discarded. Try again, or download it yourself and pass its path.")
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as e:
        hint = offline_hint or (f"pass its path instead of the name, e.g. clip_loader.load('/path/to/"
                                f"{os.path.basename(url)}') or --clip /path/to/it")
        raise RuntimeError(f"could not download {url} ({e}). If this machine is offline, fetch the file on "
                           f"another machine and {hint}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


# -----------------------------------------------------------------------------------------------------------
# Building blocks shared by the text transformer, the ViT and the ResNet's attention pooling.

class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype: fp16 statistics over 768+ channels lose
    precision, and OpenAI's released models were trained with this behaviour."""

    def forward(self, x):
        weight, bias = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that every released CLIP was trained with; swapping in the exact
    GELU changes the outputs, so parity with OpenAI needs this one."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MultiheadSelfAttention(nn.Module):
    """Self-attention whose parameters are named like `nn.MultiheadAttention`'s (a packed `in_proj_weight`
    and an `out_proj` Linear), which is how they appear in OpenAI's checkpoints, but computed batch-first
    with `F.scaled_dot_product_attention` so the flash/memory-efficient kernels are used on GPU."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * width, width) * width ** -0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False):
        B, T, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C)
        q, k, v = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, nh, T, hs) -> (B, T, C)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a 4x wide MLP."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        # A Sequential of named children gives the checkpoint's keys mlp.c_fc.* and mlp.c_proj.*
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x, causal=False):  # (B, T, C) -> (B, T, C)
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


# -----------------------------------------------------------------------------------------------------------
# Image towers: the Vision Transformer (CLIP paper section 2.4) and the modified ResNet of the RN50 family.

class VisionTransformer(nn.Module):
    def __init__(self, resolution, patch_size, width, layers, heads, embed_dim):
        super().__init__()
        grid = resolution // patch_size
        scale = width ** -0.5
        # Patchify with a strided conv; CLIP's has no bias because ln_pre follows.
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        # CLIP's ViT adds a LayerNorm before the transformer that the original ViT does not have.
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward(self, x):  # (B, 3, R, R) -> (B, E)
        x = self.conv1(x)  # (B, C, R/p, R/p)
        x = x.flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, g*g, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + g*g, C)
        x = self.transformer(self.ln_pre(x))
        # The image embedding is the class token's output, normed and projected into the joint space.
        return self.ln_post(x[:, 0]) @ self.proj  # (B, C) @ (C, E) -> (B, E)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1 convs, 4x expansion) with CLIP's change: downsampling is an average
    pool before the last conv (and before the shortcut's 1x1 conv) instead of a strided conv, which avoids
    the aliasing of strided convolutions (Zhang 2019, cited in CLIP section 2.4)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # Keys downsample.0 (conv) and downsample.1 (bn) as in the checkpoint; the pool has no weights
            # so it lives outside the Sequential to keep those indices.
            self.downsample_pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False),
                                            nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.pool(out)))
        shortcut = x if self.downsample is None else self.downsample(self.downsample_pool(x))
        return F.relu(out + shortcut)


class AttentionPool2d(nn.Module):
    """CLIP's replacement for global average pooling: one round of multi-head attention in which the query
    is the mean of the feature map and the keys/values are every position (plus the mean itself)."""

    def __init__(self, grid, width, heads, embed_dim):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) / width ** 0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, embed_dim)

    def forward(self, x):  # (B, C, g, g) -> (B, E)
        B, C = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, g*g, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1 + g*g, C)
        x = x + self.positional_embedding.to(x.dtype)
        hs = C // self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, self.heads, hs).transpose(1, 2)  # (B, nh, 1, hs)
        k = self.k_proj(x).view(B, -1, self.heads, hs).transpose(1, 2)  # (B, nh, 1 + g*g, hs)
        v = self.v_proj(x).view(B, -1, self.heads, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hs)
        return self.c_proj(y.reshape(B, C))  # (B, nh, 1, hs) -> (B, C) -> (B, E)


class ModifiedResNet(nn.Module):
    """The RN50-family image tower: a 3-conv stem with an average pool, four stages of bottlenecks, and
    attention pooling. `width` is the channel count of the first stage; the final feature map has
    width * 32 channels and resolution / 32 pixels a side."""

    def __init__(self, resolution, layers, width, heads, embed_dim):
        super().__init__()
        # Stem: three 3x3 convs (the first strided) then a 2x average pool, instead of one 7x7 conv + max pool.
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))  # keys layer1.* .. layer4.*
        self.attnpool = AttentionPool2d(resolution // 32, width * 32, heads, embed_dim)

    def forward(self, x):  # (B, 3, R, R) -> (B, E)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.avg_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # (B, width, R/4, R/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32 width, R/32, R/32)
        return self.attnpool(x)


# -----------------------------------------------------------------------------------------------------------
# The whole model, and reading its architecture off a state dict.

@dataclass
class CLIPArchitecture:
    """Everything needed to build a CLIP, as read off a checkpoint by `infer_architecture`."""
    embed_dim: int
    image_resolution: int
    vision_layers: object  # int for a ViT; a tuple of 4 stage depths for a ResNet
    vision_width: int
    vision_patch_size: object  # int for a ViT; None for a ResNet
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int

    @property
    def is_vit(self):
        return self.vision_patch_size is not None


def _count_blocks(state_dict, prefix):
    """Number of distinct integer indices i among keys `prefix.i.*`."""
    return len({k[len(prefix):].split(".")[1] for k in state_dict if k.startswith(prefix + ".")})


def infer_architecture(state_dict):
    """Read the architecture from tensor shapes. Every released CLIP uses 64-dimensional attention heads,
    which is the one fact not stored in the weights (head count = width / 64)."""
    sd = state_dict
    try:
        embed_dim = sd["text_projection"].shape[1]
        transformer_width = sd["ln_final.weight"].shape[0]
        arch = dict(embed_dim=embed_dim, context_length=sd["positional_embedding"].shape[0],
                    vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=transformer_width,
                    transformer_heads=transformer_width // 64,
                    transformer_layers=_count_blocks(sd, "transformer.resblocks"))
        if "visual.proj" in sd:  # ViT
            width, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            arch.update(vision_width=width, vision_patch_size=patch, image_resolution=grid * patch,
                        vision_layers=_count_blocks(sd, "visual.transformer.resblocks"))
        else:  # ResNet: the attention pool sees a (resolution / 32)^2 grid
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            arch.update(vision_width=sd["visual.layer1.0.conv1.weight"].shape[0], vision_patch_size=None,
                        image_resolution=grid * 32,
                        vision_layers=tuple(_count_blocks(sd, f"visual.layer{i}") for i in range(1, 5)))
    except KeyError as e:
        raise ValueError(f"not a CLIP checkpoint: the state dict has no {e.args[0]!r} "
                         f"(its first keys are {list(sd)[:5]})") from None
    return CLIPArchitecture(**arch)


class CLIP(nn.Module):
    def __init__(self, arch: CLIPArchitecture):
        super().__init__()
        self.arch = arch
        if arch.is_vit:
            self.visual = VisionTransformer(arch.image_resolution, arch.vision_patch_size, arch.vision_width,
                                            arch.vision_layers, arch.vision_width // 64, arch.embed_dim)
        else:
            self.visual = ModifiedResNet(arch.image_resolution, arch.vision_layers, arch.vision_width,
                                         arch.vision_width * 32 // 64, arch.embed_dim)
        width = arch.transformer_width
        self.token_embedding = nn.Embedding(arch.vocab_size, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(arch.context_length, width))
        self.transformer = Transformer(width, arch.transformer_layers, arch.transformer_heads)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, arch.embed_dim))
        # Learned temperature of the contrastive softmax, stored as a log; initialised to log(1/0.07).
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    @property
    def dtype(self):
        return self.text_projection.dtype

    def encode_image(self, images):  # (B, 3, R, R), already normalised -> (B, E), not l2-normalised
        return self.visual(images.to(self.dtype))

    def encode_text(self, tokens):  # (B, T) token ids, T <= context_length -> (B, E), not l2-normalised
        T = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:T].to(self.dtype)  # (B, T, C)
        x = self.ln_final(self.transformer(x, causal=True))
        # The text embedding is read at the end-of-text token, which has the largest id in the vocabulary,
        # so argmax finds it; the causal mask means it has seen the whole sentence and no padding.
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, C)
        return eot @ self.text_projection  # (B, E)

    def forward(self, images, tokens):
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()  # (B_img, B_txt)
        return logits_per_image, logits_per_image.t()


# -----------------------------------------------------------------------------------------------------------
# Loading: OpenAI's TorchScript archives, plain state dicts, fp16 or not.

# TorchScript archives carry these three scalars next to the weights; they are not parameters of the model.
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript(path):
    """A TorchScript archive stores its program under <name>/code/; a torch.save file never does."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name for name in zf.namelist())


def read_state_dict(path):
    """Return the tensors in a CLIP checkpoint file, without executing anything it contains.

    OpenAI's releases are TorchScript archives: we take their `state_dict()` on the CPU and never call
    their graph. Anything else must be a plain state dict, read with `weights_only=True` so that a pickle
    can not run code.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint {path!r} does not exist; pass a model name "
                                f"({', '.join(available_models())}) or the path of a .pt file")
    try:
        if is_torchscript(path):
            with warnings.catch_warnings():  # torch deprecates TorchScript, but OpenAI's files are in it
                warnings.simplefilter("ignore", FutureWarning)
                state_dict = dict(torch.jit.load(path, map_location="cpu").state_dict())
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many different types for a bad file; all mean the same to a user
        raise ValueError(f"{path!r} is not a readable CLIP checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"{path!r} does not hold a state dict (a dict of tensors)")
    return {k: v for k, v in state_dict.items() if k not in _JIT_EXTRA_KEYS}


def build_model(state_dict, dtype=torch.float32):
    """A CLIP in eval mode with exactly the weights in `state_dict`, converted to `dtype`."""
    arch = infer_architecture(state_dict)
    # Build on the meta device (no memory, no random init), then adopt the checkpoint's tensors.
    with torch.device("meta"):
        model = CLIP(arch)
    expected = model.state_dict().keys()
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the state dict does not fit the CLIP architecture read from it ({arch}): "
                         f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                         f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    # BatchNorm's num_batches_tracked is an integer counter and keeps its dtype.
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches: torch's message already names each tensor
        raise ValueError(f"the checkpoint's tensors do not fit together: {e}") from None
    return model.eval()


def load(name_or_path, device="cpu", jit=False, download_root=None, dtype=torch.float32):
    """Load a CLIP by name (downloaded and cached) or from a file. Returns (model, preprocess), where
    preprocess turns a PIL image into the (3, R, R) tensor `model.encode_image` expects.

    The signature is OpenAI's `clip.load`, so code written for it runs unchanged. `jit` is accepted and has
    no effect: we never run a TorchScript graph (only its weights are read), so the model is always the
    eager one, as OpenAI's jit=False gives. Unlike OpenAI's package the weights are float32 unless you ask
    otherwise, on every device: use `torch.autocast` for fast mixed precision rather than a silently fp16
    model.
    """
    if name_or_path in MODELS:
        sha256 = MODELS[name_or_path].split("/")[0]
        path = download(BASE_URL + MODELS[name_or_path], cache_dir(download_root), sha256)
    elif os.path.isfile(name_or_path):
        path = name_or_path
    else:
        raise ValueError(f"unknown CLIP model {name_or_path!r}: use one of {available_models()} "
                         f"or the path of a checkpoint file")
    model = build_model(read_state_dict(path), dtype).to(device)
    return model, image_transform(model.arch.image_resolution)


# -----------------------------------------------------------------------------------------------------------
# Image preprocessing: a PIL path identical to OpenAI's, and a differentiable tensor path for generated images.

def _to_rgb(image):
    return image.convert("RGB")


def image_transform(resolution):
    """PIL image -> (3, R, R) float tensor: bicubic resize of the shorter side, center crop, RGB, normalise."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution),
        _to_rgb,
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def preprocess_tensor(images, resolution):
    """(B, 3, H, W) images in [-1, 1] -> (B, 3, R, R) normalised CLIP input, differentiable and on the
    images' device. Stage 2's embedding-reconstruction loss sends gradients back through this, so it uses
    `F.interpolate` (antialiased bicubic, as PIL resizes) rather than PIL."""
    x = (images.float() + 1) / 2  # [-1, 1] -> [0, 1]
    H, W = x.shape[-2:]
    # Same size rule as torchvision's Resize(int): the shorter side becomes R, the longer one is truncated.
    if H <= W:
        size = (resolution, int(resolution * W / H))
    else:
        size = (int(resolution * H / W), resolution)
    if size != (H, W):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    x = x[..., top:top + resolution, left:left + resolution]  # (B, 3, R, R)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# -----------------------------------------------------------------------------------------------------------
# The tokenizer: byte-level BPE over OpenAI's merge list (shipped next to this file), with OpenAI's cleaning.

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# Pre-tokenisation: the two special tokens, English contractions, runs of letters, single digits, and runs of
# anything else that is not whitespace. Matched case-insensitively on lower-cased text.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


@functools.lru_cache()
def byte_to_unicode():
    """A reversible map from the 256 byte values to printable unicode characters, so that BPE can work on
    strings without ever seeing whitespace or control characters. Printable latin-1 bytes map to
    themselves; the other 68 bytes map to code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # Insertion order matters: it is the order of the first 256 vocabulary ids (printable bytes first).
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def clean_text(text):
    """OpenAI's text normalisation: fix mojibake, unescape HTML twice (captions scraped from the web are
    often double-escaped), collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return regex.sub(r"\s+", " ", text.strip()).strip().lower()


class Tokenizer:
    """Byte-level BPE: a word becomes its UTF-8 bytes (as printable characters), the last one marked with
    </w>, and adjacent symbols are merged in the order of the merge list until no listed pair remains."""

    def __init__(self, bpe_path=BPE_PATH):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            # Line 0 is a version header; the vocabulary uses the first 49152 - 256 - 2 merges.
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
        symbols = list(byte_to_unicode().values())
        # Ids: 256 bytes, the same 256 as word endings, one per merge, then the two special tokens.
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.merge_rank = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        # Words repeat a lot in captions; caching each word's BPE result spares merging it again.
        self.cache = {SOT: [SOT], EOT: [EOT]}

    def bpe(self, word):
        """One pre-token (already mapped to byte characters) -> its list of BPE symbols."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            # The pair that was merged earliest during BPE training is merged first, everywhere it occurs.
            best = min(zip(parts, parts[1:]), key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text):
        """Text -> BPE ids, without start/end tokens."""
        ids = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(word))
        return ids

    def decode(self, ids):
        """BPE ids -> text (lower-cased and cleaned, with a space after each word)."""
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache()
def default_tokenizer():
    return Tokenizer()


class ContextLengthError(RuntimeError, ValueError):
    """A text longer than the context. OpenAI's `clip.tokenize` raises RuntimeError here; a ValueError is
    what the mistake is, so this is both, and either `except` catches it."""


def tokenize(texts, context_length=77, truncate=False):
    """A string or list of strings -> (N, context_length) LongTensor of <|startoftext|> ids <|endoftext|>,
    zero-padded. Text longer than the context raises, unless truncate=True, which cuts it and keeps the
    end-of-text token last (the text encoder reads the embedding there)."""
    if isinstance(texts, str):
        texts = [texts]
    tok = default_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tok.sot_id] + tok.encode(text) + [tok.eot_id]
        if len(ids) > context_length:
            if not truncate:
                raise ContextLengthError(f"text {text[:40]!r}... is {len(ids)} tokens long, more than the context "
                                 f"length {context_length}; shorten it or pass truncate=True")
            ids = ids[:context_length - 1] + [tok.eot_id]
        result[row, :len(ids)] = torch.tensor(ids)
    return result


if __name__ == "__main__":
    # Zero-shot classification of one image against a few captions: python clip_loader.py NAME IMAGE TEXT...
    import argparse
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("model", help=f"one of {available_models()} or a checkpoint path")
    parser.add_argument("image")
    parser.add_argument("texts", nargs="+")
    args = parser.parse_args()
    try:  # any failure (unknown name, offline, a bad file) is one line, not a traceback
        model, preprocess = load(args.model)
        image = preprocess(Image.open(args.image)).unsqueeze(0)
    except (ValueError, RuntimeError, OSError) as e:  # PIL's UnidentifiedImageError is an OSError
        sys.exit(f"error: {e}")
    with torch.no_grad():
        logits, _ = model(image, tokenize(args.texts, truncate=True))
    for text, p in zip(args.texts, logits.softmax(dim=-1)[0].tolist()):
        print(f"{p:7.2%}  {text}")
