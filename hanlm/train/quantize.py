"""Pseudo-gradients packed for the wire: fp16, or 8- and 4-bit integers with per-block scales.

A flat fp32 tensor is cut into blocks of `block` values. Each block gets one fp16 scale, its
largest magnitude over the largest code q = 2^(bits-1) - 1 (127 for 8 bits, 7 for 4) rounded up
to the next fp16 value, and every value becomes round(x / scale), an integer in [-q, q]: one
byte each at 8 bits, two to a byte at 4. Rounding to nearest under a scale that is never below
the block's own keeps every value within half a scale step of the original (for blocks whose
largest value is below 65504·q, fp16's largest scale; beyond it values are clipped, and error
feedback carries the rest). At 16 bits a value is its fp16 cast, clipped to ±65504, with no scales.

The packed form is one uint8 tensor, codes then scales, so that a collective moves it as is and
its length is exactly the bytes on the wire.
"""

from __future__ import annotations

import math

import torch

FP16_MAX = 65504.0


class Codec:
    """Packs and unpacks flat fp32 tensors at `bits` per value (16, 8 or 4)."""

    def __init__(self, bits: int, block: int):
        if bits not in (16, 8, 4):
            raise ValueError(f"pseudo-gradients are packed at 16, 8 or 4 bits, not {bits}")
        if bits == 4 and block % 2:
            raise ValueError(f"4-bit blocks hold values in pairs; block {block} is odd")
        self.bits = bits
        # fp16 needs no scales, so its "blocks" are single values: chunks may end anywhere.
        self.block = 1 if bits == 16 else block
        self.qmax = (1 << (bits - 1)) - 1

    def padded(self, numel: int) -> int:
        """`numel` rounded up to whole blocks: what is packed."""
        return math.ceil(numel / self.block) * self.block

    def nbytes(self, numel: int) -> int:
        """Bytes of the packed form of `numel` values (a whole number of blocks)."""
        if self.bits == 16:
            return 2 * numel
        blocks = math.ceil(numel / self.block)
        return blocks * self.block * self.bits // 8 + 2 * blocks

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The packed bytes of the 1-D fp32 tensor `x` (zero-padded to whole blocks)."""
        if self.bits == 16:
            return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).view(torch.uint8)
        pad = self.padded(x.numel()) - x.numel()
        blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, self.block)
        scale = (blocks.abs().amax(dim=1) / self.qmax).clamp(max=FP16_MAX)
        half = scale.to(torch.float16)
        # Round the scale up, never down, so no value falls outside [-q, q] and gets clipped.
        half = torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, math.inf)), half)
        half = torch.where(half == 0, torch.ones_like(half), half)  # an all-zero block codes to zeros
        codes = torch.round(blocks / half.float()[:, None]).clamp_(-self.qmax, self.qmax).to(torch.int16)
        codes = (codes + self.qmax).to(torch.uint8).view(-1)
        if self.bits == 4:
            codes = codes[0::2] | (codes[1::2] << 4)
        return torch.cat([codes, half.view(torch.uint8)])

    def decode(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        """The fp32 values `encode` packed, the first `numel` of them."""
        if self.bits == 16:
            return packed.view(torch.float16)[:numel].float()
        blocks = self.padded(numel) // self.block
        # (a copy: in a gathered buffer a chunk's scales may start at an odd byte, which fp16 cannot view)
        codes, scales = packed[:-2 * blocks], packed[-2 * blocks:].clone().view(torch.float16).float()
        if self.bits == 4:
            codes = torch.stack([codes & 0x0F, codes >> 4], dim=1).view(-1)
        values = (codes.to(torch.float32) - self.qmax).view(blocks, self.block) * scales[:, None]
        return values.view(-1)[:numel]


class ErrorFeedback:
    """What rounding took from the values sent, added back to the next values sent.

    Over many rounds the sum of what was sent equals the sum of what was meant to be sent, up
    to the residual still held: at most half a quantisation step per value.
    """

    def __init__(self, codec: Codec, numel: int, device: torch.device):
        self.codec = codec
        self.residual = torch.zeros(numel, device=device)

    def encode(self, x: torch.Tensor, bounds: list[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """Pack x plus the carried residual, each chunk [a, b) of `bounds` apart (default: one chunk);
        keep what the packing lost as the new residual."""
        target = x + self.residual
        bounds = bounds or [(0, target.numel())]
        parts = [self.codec.encode(target[a:b]) for a, b in bounds]
        self.residual = target - torch.cat([self.codec.decode(p, b - a) for p, (a, b) in zip(parts, bounds)])
        return parts
