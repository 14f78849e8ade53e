"""
prior.py: stage 2 of CLIP-GEN, a GPT that writes an image's VQGAN tokens given the image's CLIP embedding
(CLIP-GEN section 3.2). Trained on images alone; at inference the CLIP *text* embedding of a prompt takes the
image embedding's place, which works because CLIP maps both into one space.

The training loss is CLIP-GEN's eq. (3): token cross-entropy plus lambda times the embedding-reconstruction
loss, which decodes the prior's own (Gumbel-softmax) predictions with the frozen VQGAN, embeds the result
with the frozen CLIP and asks it to match the input embedding. Two options come from the sibling paper
CLIP-VQDiffusion (arXiv 2403.14944): pseudo-text embeddings (noise on the image embedding, after LAFITE,
arXiv 2111.13792) and adaptive-layer-norm conditioning in every block.

    python train.py --data imgs/ --stage prior          # trains this model on top of out/vqgan.pt
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_loader


@dataclass
class PriorConfig:
    vocab_size: int = 16384  # = the VQGAN's codebook size
    n_tokens: int = 256  # image tokens per image: a 16x16 grid, written in raster order
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 1024
    clip_dim: int = 512  # CLIP embedding size (ViT-B/32: 512, ViT-L/14: 768)
    n_prefix: int = 1  # CLIP-GEN turns the embedding into this many prefix tokens
    adaln: bool = False  # also modulate every block's LayerNorms with the embedding (CLIP-VQDiffusion)
    remove_mean: bool = False  # project the training images' mean embedding out of every condition (ours)
    gelu: str = "none"  # nn.GELU's `approximate`: exact, as nanoGPT (a CPU runs it 3.6x faster than "tanh")
    embed_head: bool = False  # a head predicting the image's CLIP embedding at every position (ours; training only)
    dropout: float = 0.0

    @property
    def head_size(self):
        return self.n_embd // self.n_head


class SelfAttention(nn.Module):
    """Multi-head self-attention; causal for the GPT, bidirectional for the diffusion prior (diffusion.py)."""

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.n_head, self.causal = cfg.n_head, causal
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x, cache=None, layer=0):
        """x: (B, T, C) new positions. With a KVCache, the keys and values of this layer's earlier positions
        come from it and the new ones are appended."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3x (B, nh, T, hs)
        first = cache is None or cache.length == 0
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nh, T_past + T, hs)
        # With a cache we only ever feed one new position, which may attend to everything before it, so the
        # causal mask is needed only when several positions arrive together with no past.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and first and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class KVCache:
    """The keys and values of every position so far, per layer, for sampling one token at a time: each new
    position attends to them instead of recomputing the whole sequence. The buffers are allocated once for
    the whole sequence (at the first write, in the dtype autocast gives), so appending is a write, not a
    copy of the past (torch.cat) at every step."""

    def __init__(self, n_layer, max_len):
        self.buffers, self.max_len, self.length = [None] * n_layer, max_len, 0

    def append(self, layer, k, v):  # (B, nh, T, hs) of the new positions -> all positions', (B, nh, length + T, hs)
        if self.buffers[layer] is None:
            shape = (*k.shape[:2], self.max_len, k.shape[3])
            self.buffers[layer] = (k.new_empty(shape), v.new_empty(shape))
        K, V = self.buffers[layer]
        end = self.length + k.shape[2]
        K[:, :, self.length:end], V[:, :, self.length:end] = k, v
        return K[:, :, :end], V[:, :, :end]


class Block(nn.Module):
    """Pre-LayerNorm transformer block. With adaln, each LayerNorm's scale and shift are predicted from the
    condition (as in DiT / CLIP-VQDiffusion), zero-initialised so training starts from plain LayerNorm."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, elementwise_affine=not cfg.adaln)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, elementwise_affine=not cfg.adaln)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(approximate=cfg.gelu),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))
        self.ada = nn.Linear(cfg.n_embd, 4 * cfg.n_embd) if cfg.adaln else None

    def forward(self, x, cond, cache=None, layer=0):  # x (B, T, C), cond (B, C)
        h1 = self.ln_1(x)
        if self.ada is not None:
            shift1, scale1, shift2, scale2 = self.ada(cond).unsqueeze(1).chunk(4, dim=-1)  # 4x (B, 1, C)
            h1 = h1 * (1 + scale1) + shift1
        x = x + self.attn(h1, cache, layer)
        h2 = self.ln_2(x)
        if self.ada is not None:
            h2 = h2 * (1 + scale2) + shift2
        return x + self.mlp(h2)


class Prior(nn.Module):
    """p(image tokens | CLIP embedding). The sequence is [n_prefix condition tokens, image tokens]; the
    logits at the last prefix position predict the first image token, and so on."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.cond_proj = nn.Linear(cfg.clip_dim, cfg.n_prefix * C)
        # The "no condition" input for classifier-free guidance: a learned stand-in for the embedding.
        self.null_embedding = nn.Parameter(torch.randn(cfg.clip_dim) / cfg.clip_dim ** 0.5)
        # Unit mean of the training images' embeddings (set once by train.py; saved with the weights).
        self.register_buffer("embedding_mean", torch.zeros(cfg.clip_dim))
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.n_prefix + cfg.n_tokens, C))
        self.cond_vec = nn.Linear(cfg.clip_dim, C) if cfg.adaln else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.vocab_size, bias=False)
        self.embed_head = nn.Linear(C, cfg.clip_dim) if cfg.embed_head else None  # embedding_prediction_loss
        # GPT-2's initialisation: N(0, 0.02) everywhere, residual projections scaled down by the depth, and
        # the adaLN modulations at zero so every block starts as a plain pre-LN block.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
            elif ".ada." in name:
                nn.init.zeros_(p)
            elif p.dim() >= 2 or name == "pos_emb":
                nn.init.normal_(p, std=0.02)

    def condition(self, embeddings, drop=None):
        """(B, clip_dim) CLIP embeddings -> (B, clip_dim) conditions: see unit_condition."""
        return unit_condition(embeddings, drop, self.null_embedding, self.embedding_mean,
                              self.cfg.remove_mean).to(self.cond_proj.weight.dtype)

    def forward(self, embeddings, tokens, drop=None, cache=None, predict_embedding=False):
        """embeddings: (B, clip_dim) CLIP embeddings; tokens: (B, T) image tokens; drop: (B,) bool, rows
        that get the null condition. The condition is computed here, inside forward, so that under DDP every
        parameter (the null embedding too) is part of the graph DDP watches.

        Without a cache, or with an empty one: returns logits (B, T + 1, vocab) for image positions 0..T (all
        n_tokens of them when fed tokens[:, :-1] in training). With a KVCache that holds the prefix and
        earlier tokens: `tokens` are the next positions only, logits are for the position after each.
        predict_embedding: also return embed_head's (B, T + 1, clip_dim) guesses of the image's embedding."""
        B, T = tokens.shape
        P = self.cfg.n_prefix
        cond = self.condition(embeddings, drop)  # (B, clip_dim), unit norm
        c = self.cond_vec(cond) if self.cond_vec is not None else None  # (B, C) for adaLN
        start = 0 if cache is None else cache.length  # positions already in the cache
        if start == 0:
            prefix = self.cond_proj(cond).view(B, P, -1)  # (B, clip_dim) -> (B, P, C)
            x = torch.cat([prefix, self.tok_emb(tokens)], dim=1) + self.pos_emb[:P + T]  # (B, P + T, C)
            first = P - 1  # logits from the last prefix position on
        else:
            x = self.tok_emb(tokens) + self.pos_emb[start:start + T]  # (B, T, C)
            first = 0
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, c, cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        h = self.ln_f(x[:, first:])
        if predict_embedding:
            return self.head(h), self.embed_head(h)
        return self.head(h)  # (B, T + 1 or T, vocab)

    @torch.no_grad()
    def sample(self, embeddings, temperature=1.0, top_k=None, top_p=None, guidance=1.0, generator=None,
               use_cache=True):
        """(B, clip_dim) CLIP embeddings, or (B, P, clip_dim) for prompts in P parts -> (B, n_tokens) sampled
        image tokens.

        guidance != 1, or P > 1, runs the conditions and the null condition as one batch and mixes their
        logits (guided_rows, mix_guided). use_cache=False recomputes the whole sequence at every step (slow;
        kept as the reference the cache is tested against). Repeat rows of `embeddings` (repeat_interleave)
        to draw many samples per condition in one batch."""
        B = embeddings.shape[0]
        embeddings, drop, copies = guided_rows(embeddings, guidance)
        tokens = torch.zeros(embeddings.shape[0], self.cfg.n_tokens, dtype=torch.long, device=embeddings.device)
        cache = KVCache(self.cfg.n_layer, self.cfg.n_prefix + self.cfg.n_tokens) if use_cache else None
        for t in range(self.cfg.n_tokens):
            fed = tokens[:, t - 1:t] if use_cache and t > 0 else tokens[:, :t]  # the new token, or all so far
            logits = self(embeddings, fed, drop, cache)[:, -1].float()  # (copies x B, vocab): the next position
            nxt = sample_from_logits(mix_guided(logits, B, guidance), temperature, top_k, top_p, generator)  # (B,)
            tokens[:, t] = nxt.repeat(copies)  # every copy of a sample continues alike
        return tokens[:B]

    def use_matvec_layout(self):
        """Sampling a few sequences multiplies each weight matrix by a few vectors per token, so on a CPU
        its speed is memory bandwidth: every weight is read once per token. MKL streams a matrix laid out
        (in, out) faster than PyTorch's (out, in) when out >= in (bench.py --peers; RESULTS.md), so
        clipgen.load_prior stores those matrices that way on a CPU: the same values, which F.linear, the
        optimizers and state_dict accept in either layout. Done once, at load, since the transposing copy
        costs as much as sampling a few tokens. In place; returns the model."""
        if self.head.weight.device.type != "cpu":  # a GPU's kernels choose their own layouts
            return self
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.out_features >= m.in_features:
                m.weight.data = m.weight.data.t().contiguous().t()
        return self


def guided_rows(embeddings, guidance):
    """The batch a guided sampler runs. embeddings (B, clip_dim), or (B, P, clip_dim): each sample's prompt
    in P parts. -> (conditions (copies x B, clip_dim), drop (copies x B,), copies): rows p B .. p B + B - 1
    hold part p; with guidance != 1 or several parts, a last block of B rows gets the null condition."""
    parts = embeddings if embeddings.dim() == 3 else embeddings.unsqueeze(1)  # (B, P, clip_dim)
    B, P, _ = parts.shape
    rows = parts.transpose(0, 1).reshape(P * B, -1)
    drop = torch.zeros(P * B, dtype=torch.bool, device=rows.device)
    if guidance != 1.0 or P > 1:
        rows, drop = torch.cat([rows, parts[:, 0]]), torch.cat([drop, torch.ones_like(drop[:B])])
    return rows, drop, len(rows) // B


def mix_guided(scores, B, guidance):
    """(copies x B, ...) scores of guided_rows' batch -> (B, ...). One condition and the null one:
    classifier-free guidance, uncond + guidance * (cond - uncond) (Ho & Salimans 2022). P parts: their
    conjunction, uncond + guidance * sum_p (cond_p - uncond): the AND of composable diffusion (Liu et al.
    2022) applied to logits, the product of the parts' distributions over the unconditional one."""
    if scores.shape[0] == B:
        return scores
    *conds, uncond = scores.split(B)
    return uncond + guidance * sum(c - uncond for c in conds)


def unit_condition(embeddings, drop, null_embedding, embedding_mean, remove_mean):
    """(B, clip_dim) CLIP embeddings -> the unit-norm float conditions either prior is trained and sampled on;
    rows where `drop` (B,) is True get the learned null embedding instead (classifier-free guidance).

    With remove_mean, the component along the training images' mean embedding is projected out first.
    CLIP's image embeddings share a large constant offset that its text embeddings lack (the modality gap,
    Liang et al. 2022); trained on image embeddings alone, a prior would learn to expect that offset and
    meet text embeddings without it. The mean of the image embeddings points mostly along the offset, so
    removing it maps images and texts of the same content to nearby conditions."""
    e = without_mean(embeddings, embedding_mean) if remove_mean else F.normalize(embeddings.float(), dim=-1)
    if drop is None:
        drop = torch.zeros(e.shape[0], dtype=torch.bool, device=e.device)
    # torch.where keeps the null embedding in the graph even when no row is dropped (DDP needs that).
    return torch.where(drop.unsqueeze(1), null_embedding.float().expand_as(e), e)


def without_mean(embeddings, embedding_mean):
    """(B, clip_dim) embeddings -> unit vectors with the direction of the (clip_dim,) mean embedding projected
    out: what sets one image apart from the others, without the offset they all share."""
    e = F.normalize(embeddings.float(), dim=-1)
    m = F.normalize(embedding_mean.float(), dim=0)
    return F.normalize(e - (e @ m).unsqueeze(1) * m, dim=-1)


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """(B, V) logits -> the same with temperature applied and the excluded tokens at -inf. temperature 0 keeps
    the likeliest token alone (greedy); top_k keeps the k likeliest; top_p keeps the smallest set whose
    probability reaches p (nucleus sampling, Holtzman et al. 2019; VQ-Diffusion's "truncation")."""
    if temperature == 0:
        return logits.masked_fill(logits < logits.amax(dim=-1, keepdim=True), float("-inf"))
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))
    return logits


def sample_from_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B,) token ids, drawn after filter_logits (temperature 0: the argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def pseudo_text_embedding(embeddings, alpha, noise=None):
    """LAFITE's pseudo-text feature (used by CLIP-VQDiffusion): e' = normalize(e + alpha * n / |n|) with
    n ~ N(0, I) (drawn here unless given), applied to the unit-norm image embedding e. CLIP's text
    embeddings sit in a different region than its image embeddings (the "modality gap"); training on a
    noisy neighbourhood of each image embedding makes the prior accept the text embeddings it sees at
    inference. alpha = 0 is the identity (up to normalisation)."""
    e = F.normalize(embeddings.float(), dim=-1)
    if alpha == 0:
        return e
    n = torch.randn_like(e) if noise is None else noise.to(e)
    return F.normalize(e + alpha * F.normalize(n, dim=-1), dim=-1)


def embedding_reconstruction_loss(logits, target_embeddings, vqgan_model, clip_model, tau=1.0, hard=False):
    """CLIP-GEN eq. (2), per image: 1 - cos(CLIP(decode(tokens)), e), made differentiable. -> (B,)

    logits: (B, n_tokens, K) teacher-forced prior logits. A Gumbel-softmax sample (Jang et al. 2017) of each
    position is a point on the simplex (one-hot in the forward pass with hard=True, with the soft sample's
    gradient), which the VQGAN decodes as a mix of code vectors; the image goes through CLIP's
    differentiable preprocessing and image encoder. Both networks should be frozen (requires_grad False, eval
    mode): gradients flow through them to the prior only."""
    probs = F.gumbel_softmax(logits.float(), tau=tau, hard=hard, dim=-1)  # (B, n_tokens, K)
    images = vqgan_model.decode_soft(probs)  # (B, 3, H, W), roughly in [-1, 1]
    clip_input = clip_loader.preprocess_tensor(images, clip_model.arch.image_resolution)
    predicted = clip_model.encode_image(clip_input).float()  # (B, clip_dim)
    return 1 - F.cosine_similarity(predicted, target_embeddings.float(), dim=-1)


def clipgen_loss(logits, tokens, embeddings, drop, embed_weight=0.0, embed_rows=0, vqgan_model=None,
                 clip_model=None, tau=1.0, hard=False):
    """CLIP-GEN eq. (3): L = cross-entropy(tokens) + lambda * L_embed. -> (loss, ce, embed)

    logits (B, n_tokens, K) from forward(condition, tokens[:, :-1], drop); tokens (B, n_tokens); embeddings
    (B, clip_dim), the images' true CLIP embeddings (the target even when the condition was a pseudo-text
    embedding: the image is what it is). The embedding loss (eq. 2) decodes images and runs CLIP, several
    times the cost of the GPT step, so it is computed on the first `embed_rows` rows only (0: skipped), and
    only over rows that kept their condition: a row given the null condition is the unconditional model,
    which must not be asked to reproduce one particular image. `embed` is the mean over those rows."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
    embed = torch.zeros((), device=logits.device)
    if embed_weight > 0 and embed_rows > 0:
        k = embed_rows
        per_row = embedding_reconstruction_loss(logits[:k], embeddings[:k], vqgan_model, clip_model, tau, hard)
        kept = (~drop[:k]).float()  # (k,); a mask, not an index, so no wait for the GPU
        embed = (per_row * kept).sum() / kept.sum().clamp_min(1)
    return ce + embed_weight * embed, ce, embed


def embedding_prediction_loss(predicted, embeddings, embedding_mean):
    """An auxiliary objective of ours (issue 22): through a linear head, every position predicts the CLIP
    embedding of the image being drawn from the condition and the tokens so far. -> 1 - cosine, averaged over
    positions and rows. predicted (B, n_tokens, clip_dim) from forward(..., predict_embedding=True);
    embeddings (B, clip_dim) the images' own; embedding_mean (clip_dim,) the training images' mean. Rows given
    the null condition count too: there the tokens alone must tell what is being drawn. The aim is to keep
    the image's content, the second attribute as well as the colour, readable in the hidden state of every
    position, far from the prefix that states it. The target is the embedding without the mean: image
    embeddings share a large offset, and against it a head that predicts the mean alone would already score
    a cosine near 1 and learn nothing of the content."""
    target = without_mean(embeddings, embedding_mean).unsqueeze(1)  # (B, 1, clip_dim)
    return (1 - F.cosine_similarity(predicted.float(), target, dim=-1)).mean()


def from_checkpoint(ckpt, path, device="cpu"):
    """A GPT prior rebuilt from the self-describing checkpoint dict train.py wrote (read from `path`, named in
    errors), in eval mode and, on a CPU, in the matvec layout sampling wants there. clipgen.load_prior reads
    the file and calls this or diffusion.from_checkpoint, whichever prior the file holds."""
    if ckpt.get("prior_type", "ar") != "ar":
        raise ValueError(f"{path} holds a {ckpt['prior_type']} prior, not the GPT; load it with clipgen.load_prior")
    model = Prior(saved_config(PriorConfig, ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval().use_matvec_layout(), ckpt


def saved_config(config_class, saved):
    """A prior's config as a checkpoint saved it (a dict) -> config_class. Runs saved before the `gelu` field
    existed trained with GPT-2's tanh approximation, and must go on computing the function they learned."""
    return config_class(**{"gelu": "tanh", **saved})
