"""ELECTRA pretraining (Clark et al. 2020, "ELECTRA: Pre-training Text Encoders as Discriminators Rather
Than Generators"): a small masked-LM generator fills the masked positions with plausible tokens, and the
discriminator — the `Encoder` that fine-tuning keeps — learns from every position whether its token was
replaced (replaced-token detection, RTD).

Shapes: the generator has the discriminator's depth at `train.electra_generator` × its width (heads in
proportion), reading and predicting through the discriminator's token embedding (shared embeddings, with
a projection each way as the paper's smaller generators have). Loss: generator MLM + `train.rtd_weight` ×
RTD (binary cross-entropy over every position). Tokens are sampled from the generator without gradient.
A checkpoint holds `discriminator.*`, `generator.*` and `rtd_head.*`; `backbone_weights` gives the
discriminator's, which is what fine-tuning and evaluation load.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hanlm.config import ModelConfig
from hanlm.models.base import LanguageModel
from hanlm.models.encoder import Encoder
from hanlm.models.gpt import Block, init_weights, register_rotary

PREFIX = "discriminator."


def generator_shape(cfg: ModelConfig, ratio: float) -> ModelConfig:
    """The generator's model config: the same depth, `ratio` × the width (a multiple of 2 × its heads, at
    least one head of 2 channels), heads in proportion."""
    heads = max(1, round(cfg.n_head * ratio))
    width = max(2 * heads, 2 * heads * round(cfg.n_embd * ratio / (2 * heads)))
    # a small network of its own shape: one key/value head per head, the default head and MLP widths
    return dataclasses.replace(cfg, n_embd=width, n_head=heads, n_kv_head=None, head_dim=None, intermediate_size=None)


class Generator(nn.Module):
    """The small masked-LM: the discriminator's embeddings projected in, its blocks, projected back out."""

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()
        self.emb_proj = nn.Linear(width, cfg.n_embd, bias=False)
        self.blocks = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.n_embd, width, bias=False)
        register_rotary(self, cfg)
        init_weights(self, self.blocks)

    def forward(self, embedded: Tensor) -> Tensor:
        """Hidden states (B, T, width) in the discriminator's embedding space, from its embeddings (B, T, width)."""
        T = embedded.size(1)
        rot = torch.complex(self.rope_cos[:T].float(), self.rope_sin[:T].float())[..., None, None, :]
        h = self.emb_proj(embedded)
        for block in self.blocks:
            h = block(h, rot)
        return self.out_proj(self.norm(h))


class ElectraPretraining(LanguageModel):
    """Generator + discriminator + RTD head; `forward(x, y)` is the pretraining loss of a masked batch."""

    generates = False

    def __init__(self, cfg: ModelConfig, vocab_size: int, generator_ratio: float, rtd_weight: float):
        super().__init__()
        self.discriminator = Encoder(cfg, vocab_size)
        self.generator = Generator(generator_shape(cfg, generator_ratio), cfg.n_embd)
        self.rtd_head = nn.Linear(cfg.n_embd, 1)
        self.vocab_size, self.context_length = vocab_size, cfg.context_length
        self.rtd_weight = rtd_weight
        self.last: dict[str, float] = {}  # the parts of the last loss, for the log

    @property
    def tok_emb(self) -> nn.Embedding:  # what the optimizer's roles and the vectors loader look for
        return self.discriminator.tok_emb

    @property
    def lm_head(self) -> nn.Linear:
        return self.discriminator.lm_head

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.discriminator.set_activation_checkpointing(enabled)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """x: a masked batch (B, T); y: the original token at each masked position, -1 elsewhere. The loss:
        the generator's cross-entropy at the masked positions + rtd_weight × the discriminator's binary
        cross-entropy over every position of the batch with the generator's samples put in."""
        if y is None:
            raise TypeError("ElectraPretraining computes a pretraining loss: give the targets y")
        emb = self.discriminator.tok_emb.weight
        masked = y.ne(-1)  # (B, T)
        g = self.generator(self.discriminator.tok_emb(x))[masked]  # (N, C)
        logits = F.linear(g, emb).float()  # (N, V)
        gen_loss = F.cross_entropy(logits, y[masked]) if masked.any() else logits.sum() * 0.0
        with torch.no_grad():
            sampled = torch.multinomial(logits.softmax(-1), 1).squeeze(-1)
        corrupted = x.masked_scatter(masked, sampled)
        original = torch.where(masked, y, x)
        replaced = corrupted.ne(original).float()  # (B, T)
        rtd = self.rtd_head(self.discriminator.hidden(corrupted)).squeeze(-1).float()  # (B, T)
        rtd_loss = F.binary_cross_entropy_with_logits(rtd, replaced)
        self.last = {"generator_loss": float(gen_loss.detach()), "rtd_loss": float(rtd_loss.detach()),
                     "rtd_accuracy": float(((rtd > 0).float() == replaced).float().mean())}
        return gen_loss + self.rtd_weight * rtd_loss

    def hidden(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.discriminator.hidden(x, lengths)

    def initial_state(self, batch_size: int = 1):
        return self.discriminator.initial_state(batch_size)

    def log_probs(self, tokens: Tensor, state):
        return self.discriminator.log_probs(tokens, state)

    def flops_per_token(self, seq_len: int) -> float:
        """The discriminator's and the generator's (6 per weight, plus attention's square) and the head's."""
        gen = self.generator
        gen_width = gen.emb_proj.weight.size(0)
        gen_flops = 6.0 * sum(p.numel() for p in gen.parameters()) + 12.0 * len(gen.blocks) * gen_width * seq_len
        return self.discriminator.flops_per_token(seq_len) + gen_flops + 6.0 * self.rtd_head.weight.numel()


def backbone_weights(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's weights from a checkpoint's: the discriminator's from an ELECTRA pretraining one (its
    generator and RTD head are pretraining's alone), else the weights as they are."""
    if not any(k.startswith(PREFIX) for k in weights):
        return weights
    return {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}
