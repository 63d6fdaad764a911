"""The retrofit step as one module: what a micro-batch computes (docs/design.md, "Losses and schedule")."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from dms_flex import data as dms_data
from dms_flex.losses import chunked_kd_loss, compression_loss, distillation_mask
from dms_flex.quant import dequantized
from dms_flex.torchtune_model import forward_train, output_weight


class RetrofitStep(nn.Module):
    """Everything a micro-batch computes, inside one module call.

    FSDP2 gathers a module's parameters in its forward; the KD loss reads the output projection
    directly, so it must run inside the root module's forward. The teacher copy is deliberately
    not a submodule: it is frozen and never sharded. Without a copy the teacher is the student with
    eviction off and, with `lora`, its LoRA disabled (torchtune's disable_adapter): the frozen base.
    `eviction=False` (phase 1 of the borrowed variant, `zeroing`): distillation only, nothing evicted.
    `timer` (None: off; the recipe sets it for an eager step only, dms_flex/retrofit/timing.py): marks between
    teacher, student, distillation and the logged LM loss, and where backward leaves the distillation.
    """

    timer = None

    def __init__(
        self,
        student: nn.Module,
        teacher: Optional[nn.Module],
        *,
        activation_checkpointing: bool,
        kd_chunk_size: int,
        kd_temperature: float,
        log_lm_loss: bool,
        kv_int8: bool = False,
        lora: bool = False,
    ):
        super().__init__()
        self.lora = lora
        self.kv_int8 = kv_int8  # the student sees int8 K/V (straight-through); the teacher stays full precision
        self.student = student
        self._teacher = [teacher]  # a list keeps it out of the module tree
        self.activation_checkpointing = activation_checkpointing
        self.kd_chunk_size = kd_chunk_size
        self.kd_temperature = kd_temperature
        self.log_lm_loss = log_lm_loss

    def forward(
        self, tokens, targets, doc_ids, valid, alpha_target: torch.Tensor, generator=None, eviction: bool = True
    ) -> Dict[str, Any]:
        teacher = self._teacher[0] or self.student
        base_only = nullcontext()
        if self.lora and teacher is self.student:
            from torchtune.modules.peft import disable_adapter

            base_only = disable_adapter(self.student)
        with torch.no_grad(), base_only:
            t_hidden = forward_train(teacher, tokens, doc_ids=doc_ids, eviction=False, training=False).hidden
        timer = self.timer
        if timer is not None:
            timer.mark("teacher_forward")
        out = forward_train(
            self.student,
            tokens,
            doc_ids=doc_ids,
            eviction=eviction,
            training=True,
            generator=generator,
            activation_checkpointing=self.activation_checkpointing,
            kv_int8=self.kv_int8,
        )
        if timer is not None:
            timer.mark("student_forward")
            timer.mark_on_grad(out.hidden, "distillation_backward")
        w = dequantized(output_weight(self.student))  # a quantized frozen base: the values it stands for
        mask = distillation_mask(targets)
        kd = chunked_kd_loss(
            out.hidden,
            t_hidden,
            w,
            mask,
            chunk_size=self.kd_chunk_size,
            temperature=self.kd_temperature,
            teacher_output_weight=dequantized(output_weight(teacher)) if teacher is not self.student else None,
        )
        if eviction:
            comp, evicted = compression_loss(out.alpha_st, alpha_target, valid), out.evicted
        else:  # distillation only: no loss to evict, and every token kept
            comp = kd.new_zeros(())
            B, T = tokens.shape
            evicted = [
                torch.zeros(B, L.attn.num_kv_heads, T, dtype=torch.bool, device=tokens.device)
                for L in self.student.layers
            ]
        if timer is not None:
            timer.mark("distillation_forward")
        lm = lm_loss(out.hidden, w, targets, self.kd_chunk_size) if self.log_lm_loss else kd.new_zeros(())
        if timer is not None:
            timer.mark("lm_loss_log")
        return {"kd": kd, "compression": comp, "lm": lm, "evicted": evicted}

    @torch.no_grad()
    def measure(self, tokens, doc_ids) -> List[torch.Tensor]:
        """Hard decisions (no noise, `l > 0` evicts), as at inference: per layer (B, Hkv, T)."""
        return forward_train(self.student, tokens, doc_ids=doc_ids, training=False, kv_int8=self.kv_int8).evicted


@torch.no_grad()
def lm_loss(hidden, weight, targets, chunk: int) -> torch.Tensor:
    """Next-token cross entropy (for the log only), a chunk of tokens at a time."""
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        logits = (h[s : s + chunk] @ weight.detach().t()).float()
        total = total + torch.nn.functional.cross_entropy(
            logits, t[s : s + chunk], ignore_index=dms_data.IGNORE_INDEX, reduction="sum"
        )
    return total / (t != dms_data.IGNORE_INDEX).sum().clamp_min(1)
