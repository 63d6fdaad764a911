"""DMS retrofit: teach an existing LLM which KV-cache entries it may drop (docs/design.md, "Losses and schedule").

    tune run dms_retrofit --config llama3_8b                             # one device
    tune run --nproc_per_node 8 dms_retrofit --config llama3_8b          # FSDP2 over 8 GPUs
    tune run dms_retrofit --config smollm2_135m max_steps=50             # key=value overrides
    tune run dms_retrofit --config ./my_retrofit.yaml                    # your own yaml

Bare config names (llama3_8b, llama3_1_8b, llama3_2_1b, llama3_2_3b, qwen2_5_7b, smollm2_135m, tiny,
smollm2_135m_qat_kv, llama3_8b_qat_kv)
are the yaml files shipped in dms_flex/configs/; anything else is a path.

The student is the model with DMS (soft, noisy eviction decisions); the teacher is the same model
with eviction off: the student itself when only the DMS adapter trains (the base is frozen, so the
two coincide), otherwise a frozen copy of the original weights. Per step:

    loss = KL(teacher || student) over next-token distributions   (chunked over the vocabulary)
         + max(0, alpha_target(step) - fraction evicted)           (alpha_target = 1 - 1/CR(step))

with CR(step) rising linearly from dms.initial_cr to dms.final_cr over dms.final_step steps. The
plain LM loss is only logged. Master weights and optimizer state are fp32; with dtype=bf16 the
forward runs under bf16 autocast and the frozen teacher copy is held in bf16.

quant: kv_int8 (true: the student's K and V go through the int8 cache's round trip, straight-through
gradient; the teacher stays full precision) and base_weights (none|int8|nf4: the frozen base held
quantized, adapter-only runs on one device; checkpoints keep the full-precision base). config.json
records them as dms_kv_dtype / dms_weight_quant, the defaults of `python -m dms_flex.generate`.

Outputs under output_dir: step_NNNNNN/ (resumable: fp32 Hugging Face folder + recipe_state.pt),
final/ (Hugging Face folder in save_dtype with the DMS keys in config.json, loadable by
`python -m dms_flex.generate --checkpoint`), kept_heatmap.png (kept fraction per layer and KV
head, hard decisions), logs/, and retrofit_run.json (what the recipe wrote there and the run started
last). output_dir must hold nothing else (overwrite=true allows it). resume_from (a step folder, or
latest: the newest intact one of the run started last) resumes only a checkpoint of the same run:
same RESULT_KEYS settings, same packed data, step <= max_steps.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchtune import config

import dms_flex
from dms_flex import checkpoints as ckpt
from dms_flex import data as dms_data
from dms_flex.checkpoints import pretrained
from dms_flex.config import DMSConfig, DMSConfigError
from dms_flex.losses import chunked_kd_loss, compression_loss, distillation_mask
from dms_flex.quant import dequantized
from dms_flex.stats import CompressionReport, kept_fraction, plot_kept_heatmap
from dms_flex.torchtune_model import add_dms, forward_train, output_weight

CONFIG_DIR = Path(dms_flex.__file__).resolve().parent / "configs"
RECIPE_STATE = "recipe_state.pt"
# in output_dir: which run was started there last and what the recipe wrote (anything else there is the
# user's, and refused without overwrite=true); in every step_NNNNNN/ and final/: the run that wrote it
RUN_RECORD = "retrofit_run.json"
_STEP_RE = re.compile(r"^step_\d+$")
_OURS_RE = re.compile(rf"^(step_\d+|final|{re.escape(RUN_RECORD)})$")  # what a temporary name may stand for
# the settings that change a run's result: a resumed run must have the same (the data are checked too)
RESULT_KEYS = ("checkpoint_dir", "model", "tokenizer", "dataset", "max_seq_len", "split_across_rows", "shuffle",
               "seed", "dms", "train_adapter_only", "optimizer", "lr_scheduler", "clip_grad_norm", "batch_size",
               "gradient_accumulation_steps", "max_steps", "dtype", "kd_temperature", "quant", "save_dtype")
_RESULT_DEFAULTS = {"split_across_rows": True, "shuffle": True, "train_adapter_only": False, "kd_temperature": 1.0,
                    "save_dtype": "bf16"}
_CONFIG_NAME = None  # the bare name given to --config, for messages


class RecipeError(Exception):
    """A problem with the user's set-up or config; printed as one message, without a traceback."""


# ============================================================================ the step as one module
class RetrofitStep(nn.Module):
    """Everything a micro-batch computes, inside one module call.

    FSDP2 gathers a module's parameters in its forward; the KD loss reads the output projection
    directly, so it must run inside the root module's forward. The teacher copy is deliberately
    not a submodule: it is frozen and never sharded.
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], *, activation_checkpointing: bool,
                 kd_chunk_size: int, kd_temperature: float, log_lm_loss: bool, kv_int8: bool = False):
        super().__init__()
        self.kv_int8 = kv_int8  # the student sees int8 K/V (straight-through); the teacher stays full precision
        self.student = student
        self._teacher = [teacher]  # a list keeps it out of the module tree
        self.activation_checkpointing = activation_checkpointing
        self.kd_chunk_size = kd_chunk_size
        self.kd_temperature = kd_temperature
        self.log_lm_loss = log_lm_loss

    def forward(self, tokens, targets, doc_ids, valid, alpha_target: torch.Tensor,
                generator=None) -> Dict[str, Any]:
        teacher = self._teacher[0] or self.student
        with torch.no_grad():
            t_hidden = forward_train(teacher, tokens, doc_ids=doc_ids, eviction=False, training=False).hidden
        out = forward_train(self.student, tokens, doc_ids=doc_ids, training=True, generator=generator,
                            activation_checkpointing=self.activation_checkpointing, kv_int8=self.kv_int8)
        w = dequantized(output_weight(self.student))  # a quantized frozen base: the values it stands for
        mask = distillation_mask(targets)
        kd = chunked_kd_loss(out.hidden, t_hidden, w, mask, chunk_size=self.kd_chunk_size,
                             temperature=self.kd_temperature,
                             teacher_output_weight=dequantized(output_weight(teacher))
                             if teacher is not self.student else None)
        comp = compression_loss(out.alpha_st, alpha_target, valid)
        lm = _lm_loss(out.hidden, w, targets, self.kd_chunk_size) if self.log_lm_loss else kd.new_zeros(())
        return {"kd": kd, "compression": comp, "lm": lm, "evicted": out.evicted}

    @torch.no_grad()
    def measure(self, tokens, doc_ids) -> List[torch.Tensor]:
        """Hard decisions (no noise, `l > 0` evicts), as at inference: per layer (B, Hkv, T)."""
        return forward_train(self.student, tokens, doc_ids=doc_ids, training=False, kv_int8=self.kv_int8).evicted


@torch.no_grad()
def _lm_loss(hidden, weight, targets, chunk: int) -> torch.Tensor:
    """Next-token cross entropy (for the log only), a chunk of tokens at a time."""
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        logits = (h[s:s + chunk] @ weight.detach().t()).float()
        total = total + torch.nn.functional.cross_entropy(logits, t[s:s + chunk], ignore_index=dms_data.IGNORE_INDEX,
                                                          reduction="sum")
    return total / (t != dms_data.IGNORE_INDEX).sum().clamp_min(1)


def kept_tokens(evicted: List[torch.Tensor], doc_ids: torch.Tensor, valid: torch.Tensor,
                window: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L, Hkv) tokens a cache would still hold at the end of each document, summed over the
    documents of the batch, and the number of tokens seen. Each packed document is its own sequence
    (stats.kept_fraction per document), so CR = total / kept."""
    B, T = doc_ids.shape
    spans = []  # (row, start, length) of every real document
    ids, ok = doc_ids.cpu(), valid.cpu()
    for b in range(B):
        change = torch.nonzero(ids[b, 1:] != ids[b, :-1]).flatten().add(1).tolist()
        for s, e in zip([0] + change, change + [T]):
            if bool(ok[b, s]):
                spans.append((b, s, e - s))
    n = torch.tensor([L for _, _, L in spans], device=doc_ids.device)
    width = int(n.max())
    offs = torch.arange(width)
    index = torch.stack([b * T + s + offs.clamp(max=L - 1) for b, s, L in spans]).to(doc_ids.device)
    kept = []
    for ev in evicted:  # (B, H, T) -> one row per document
        H = ev.shape[1]
        per_doc = ev.permute(1, 0, 2).reshape(H, B * T)[:, index].permute(1, 0, 2)
        kept.append((kept_fraction(per_doc, window, n) * n[:, None]).sum(0))
    return torch.stack(kept).float(), n.sum().float()


# ============================================================================ the recipe
class DMSRetrofitRecipe:
    """Reads top to bottom: __init__ (devices, process group), setup (data, models, optimizer,
    resume), train, save_checkpoint, cleanup."""

    def __init__(self, cfg: DictConfig) -> None:
        _validate(cfg)
        self.dms = DMSConfig.from_dict(OmegaConf.to_container(cfg.dms, resolve=True))
        self.adapter_only = bool(cfg.get("train_adapter_only", False))
        if self.adapter_only and self.dms.decision != "adapter":
            raise RecipeError("train_adapter_only=true needs dms.decision=adapter: the borrowed-neuron variant has "
                              "no adapter, it always trains all weights")
        self.kv_int8, self.base_weights = _quant_settings(cfg)
        cfg.quant = {"kv_int8": self.kv_int8, "base_weights": self.base_weights}  # logged in full with the config
        if self.base_weights != "none" and not (self.adapter_only and self.dms.decision == "adapter"):
            raise RecipeError(f"quant.base_weights={self.base_weights} quantizes a frozen base: it needs "
                              f"train_adapter_only=true and dms.decision=adapter (got train_adapter_only="
                              f"{str(self.adapter_only).lower()}, dms.decision={self.dms.decision})")
        if cfg.get("checkpoint_dir", None) is not None and not (Path(cfg.checkpoint_dir) / "config.json").is_file():
            raise RecipeError(_missing_weights_message(cfg, Path(cfg.checkpoint_dir)))
        self.output_dir = Path(os.path.expanduser(str(cfg.output_dir))).absolute()
        self.overwrite = bool(cfg.get("overwrite", False))
        self.manifest = check_output_dir(self.output_dir, self.overwrite)  # before anything is written
        self.settings = result_settings(cfg, self.dms, self.kv_int8, self.base_weights)
        from torchtune import training, utils

        self.distributed = training.is_distributed()
        if self.distributed and self.base_weights != "none":
            raise RecipeError(f"quant.base_weights={self.base_weights} runs on one device (the adapter-only "
                              f"retrofit of a quantized base is sized for one GPU); FSDP over several ranks shards "
                              f"plain weights only: drop --nproc_per_node or set quant.base_weights=none")
        self.device = _device(cfg.get("device", "auto"), self.distributed)
        if self.distributed:
            from torch.distributed import init_process_group

            init_process_group(backend=training.get_distributed_backend(self.device.type))
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        self.compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]
        self.save_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.get("save_dtype", "bf16")]
        self.max_steps = int(cfg.max_steps)
        self.grad_accum = int(cfg.gradient_accumulation_steps)
        self.batch_size = int(cfg.batch_size)
        self.clip = cfg.get("clip_grad_norm", None)
        self.save_every = cfg.get("save_every_n_steps", None)
        self.log_every = int(cfg.get("log_every_n_steps", 1))
        self.seed = int(cfg.seed)
        self.global_step = 0
        self.epoch = 0

    # ------------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        torch.manual_seed(self.seed)
        if self.is_rank_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            clean_leftovers(self.output_dir, self._log)
            if self.manifest["foreign"]:
                self._log(f"overwrite=true: {self.output_dir} holds entries this recipe did not write "
                          f"({', '.join(self.manifest['foreign'][:6])}); the run replaces those it writes to")
            self._claim("torchtune_config.yaml")
            log_dir = cfg.metric_logger.get("log_dir", None)
            if log_dir is not None:
                inside = Path(os.path.expanduser(str(log_dir))).absolute()
                if inside != self.output_dir and self.output_dir in inside.parents:
                    self._claim(inside.relative_to(self.output_dir).parts[0], replace=False)
            self.metric_logger = config.instantiate(cfg.metric_logger)
            self.metric_logger.log_config(cfg)
        if self.distributed:
            torch.distributed.barrier()  # leftovers of an interrupted save are gone before any rank looks
        self.tokenizer = _instantiate(cfg.tokenizer, "tokenizer")
        self._setup_models(cfg)
        # a resumed run continues the run id of its checkpoint; a new run gets its own
        self.run_id = (self._resume_record or {}).get("run_id") or uuid.uuid4().hex[:12]
        if self.is_rank_zero:
            self.manifest["run_id"] = self.run_id
            self._save_manifest()
        self._setup_data(cfg)
        trainable = [p for p in self.step.parameters() if p.requires_grad]
        self.optimizer = _instantiate(cfg.optimizer, "optimizer", trainable)
        self.lr_scheduler = None
        if cfg.get("lr_scheduler", None) is not None:
            self.lr_scheduler = _instantiate(cfg.lr_scheduler, "lr_scheduler", self.optimizer,
                                             num_training_steps=self.max_steps)
        # the noise of the eviction relaxation has its own generator: its state is part of a checkpoint
        self.noise = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + self.rank)
        if self._resume_folder is not None:
            self._load_recipe_state(self._resume_folder)
        self.train_step = torch.compile(self.step) if cfg.get("compile", False) else self.step
        n_train = sum(p.numel() for p in trainable)
        n_all = sum(p.numel() for p in self.step.parameters())
        self._log(f"student: {n_all:,} parameters ({n_train:,} trained), DMS {self.dms.decision} "
                  f"window {self.dms.window}, CR {self.dms.initial_cr:g} -> {self.dms.final_cr:g} over "
                  f"{self.dms.final_step} steps; teacher: "
                  f"{'the student with eviction off' if self.teacher is None else 'frozen copy of the original'}; "
                  f"{self.world_size} rank(s) on {self.device.type}, {cfg.dtype}")

    def _setup_models(self, cfg: DictConfig) -> None:
        """Student (fp32 master weights, DMS attached), teacher, and the resume folder if any."""
        self._resume_folder = self._choose_resume_folder(cfg.get("resume_from", None))
        source, self.hf_config, self.family = self._original_model(cfg)
        needs_teacher = not self.adapter_only
        if self.distributed:
            student, teacher = self._sharded_student(cfg, source, needs_teacher)
        else:
            if self._resume_folder is not None:
                student = self._model_from_folder(self._resume_folder, torch.float32, cfg)
            else:
                student = copy.deepcopy(source) if needs_teacher else source
            teacher = source if needs_teacher else None
            student = student.to(device=self.device, dtype=torch.float32)
        if teacher is not None:
            teacher.to(device=self.device, dtype=self.compute_dtype).eval().requires_grad_(False)
        self._freeze_base(student)
        self._base_originals = self._quantize_base(student, cfg)
        self.teacher = teacher
        self.step = RetrofitStep(student, teacher, activation_checkpointing=bool(cfg.get("enable_activation_checkpointing",
                                                                                        False)),
                                 kd_chunk_size=int(cfg.get("kd_chunk_size", 1024)),
                                 kd_temperature=float(cfg.get("kd_temperature", 1.0)),
                                 log_lm_loss=bool(cfg.get("log_lm_loss", True)), kv_int8=self.kv_int8)
        if self.distributed:
            self._shard(cfg)
            self._load_full_state(cfg, student)
        self.step.train()

    def _original_model(self, cfg: DictConfig):
        """The model before retrofit, on CPU, DMS attached: from checkpoint_dir, or random init from
        the `model` component (checkpoint_dir: null)."""
        if cfg.get("checkpoint_dir", None) is None:
            if cfg.get("model", None) is None:
                raise RecipeError("the config needs checkpoint_dir (a Hugging Face folder) or a `model` component "
                                  "(random initialisation)")
            model_cfg = cfg.model
            if str(model_cfg.get("vocab_size", "auto")) == "auto":
                model_cfg = OmegaConf.merge(model_cfg, {"vocab_size": self.tokenizer.vocab_size})
            torch.manual_seed(self.seed)  # the same initial weights on every rank and every resume
            model = config.instantiate(model_cfg)
            hf_config = _hf_config_of(model, self.tokenizer)
            return add_dms(model, self.dms), hf_config, "llama"
        loaded = self._load_folder(Path(cfg.checkpoint_dir), self.compute_dtype if self.distributed else torch.float32,
                                   cfg, original=True)
        model = add_dms(loaded.model, self.dms)
        if loaded.extra_state and self.dms.decision == "adapter":  # continuing from a DMS checkpoint
            pretrained.load_dms_state(model, loaded.extra_state, source=str(cfg.checkpoint_dir))
        hf_config = {k: v for k, v in loaded.hf_config.items() if not k.startswith("dms_")}
        return model, hf_config, loaded.family

    def _load_folder(self, folder: Path, dtype, cfg: DictConfig, original: bool):
        if original and not (folder / "config.json").is_file():
            raise RecipeError(_missing_weights_message(cfg, folder))
        try:
            return ckpt.load_hf_checkpoint(folder, dtype=dtype, max_seq_len=int(cfg.max_seq_len))
        except FileNotFoundError as e:
            raise RecipeError(_missing_weights_message(cfg, folder) if original else str(e)) from None
        except ValueError as e:
            raise RecipeError(f"cannot load {folder}: {e}") from None

    def _model_from_folder(self, folder: Path, dtype, cfg: DictConfig) -> nn.Module:
        """A retrofit checkpoint (ours): base weights plus DMS parameters."""
        loaded = self._load_folder(folder, dtype, cfg, original=False)
        model = add_dms(loaded.model, self.dms)
        pretrained.load_dms_state(model, loaded.extra_state, source=str(folder))
        return model

    def _freeze_base(self, student: nn.Module) -> None:
        if not self.adapter_only:
            return
        for name, p in student.named_parameters():
            p.requires_grad_(ckpt.is_extra_key(name))
        if not self.distributed:  # frozen weights need no fp32 master copy (FSDP wants one dtype per unit)
            for name, p in student.named_parameters():
                if not p.requires_grad:
                    p.data = p.data.to(self.compute_dtype)

    def _quantize_base(self, student: nn.Module, cfg: DictConfig) -> Dict[str, torch.Tensor]:
        """quant.base_weights: the frozen base's linear layers held quantized (torchao int8 weight-only,
        or NF4 as torchtune's QLoRA recipes hold theirs); the DMS adapter stays full precision. The
        student with eviction off is also the teacher, so both see the same quantized base.
        Returns the full-precision weights that were quantized (on CPU): checkpoints save those, so
        they stay plain Hugging Face folders and `generate --weight-quant` re-derives the same
        quantized values."""
        if self.base_weights == "none":
            return {}
        from dms_flex import quant

        self._log(capacity_estimate(self.hf_config, self.base_weights, self.dms, cfg))
        plain = {f"{n}.weight": m.weight.detach().to("cpu", copy=True) for n, m in student.named_modules()
                 if isinstance(m, nn.Linear) and "dms_adapter" not in n}
        if self.base_weights == "int8":
            quant.quantize_weights(student, "int8")
            skipped = []
        else:
            skipped = quant.quantize_weights_nf4(student)
        names = quant.quantized_weight_names(student)
        self._log(f"quant.base_weights={self.base_weights}: {len(names)} linear weights quantized"
                  + (f"; left in {self.compute_dtype} (size not NF4-blockable): {', '.join(skipped)}" if skipped else ""))
        return {f"student.{n}": plain[n] for n in names}

    # ---- FSDP2 ---------------------------------------------------------------------------------
    def _sharded_student(self, cfg: DictConfig, source: nn.Module, needs_teacher: bool):
        """A meta-device student (fp32) to shard; its weights arrive in _load_full_state from rank 0's
        copy of the source (which every rank also keeps as its teacher when it needs one)."""
        self._source = source if self.is_rank_zero else None
        with torch.device("meta"):
            if cfg.get("checkpoint_dir", None) is None:
                model_cfg = OmegaConf.merge(cfg.model, {"vocab_size": self.hf_config["vocab_size"]})
                student = config.instantiate(model_cfg)
            else:
                student = ckpt.build_decoder(self.hf_config, max_seq_len=int(cfg.max_seq_len), family=self.family)
            student = add_dms(student, self.dms)
        return student, (source if needs_teacher else None)

    def _shard(self, cfg: DictConfig) -> None:
        """Attention projections and MLPs of every layer are FSDP units: forward_train calls them
        as modules, so their hooks gather and free them. Embeddings, norms, the output projection and
        the DMS adapters stay in the root unit (RetrofitStep), which is whole during its forward."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import register_fsdp_forward_method
        from torchtune import training

        unit = re.compile(r"^student\.layers\.\d+\.(attn\.(q_proj|k_proj|v_proj|output_proj)|mlp)$")
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        training.shard_model(self.step, [lambda name, module: bool(unit.match(name))], cpu_offload=False,
                             reshard_after_forward=bool(cfg.get("fsdp_reshard_after_forward", True)), dp_mesh=mesh)
        register_fsdp_forward_method(self.step, "measure")

    def _load_full_state(self, cfg: DictConfig, student: nn.Module) -> None:
        # torch's distributed state-dict API directly: torchtune 0.6.1's loader needs the full state
        # dict on every rank, this one reads it on rank 0 and broadcasts the shards.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torchtune import training

        with torch.device(self.device):
            for m in student.modules():
                if hasattr(m, "rope_init"):  # RoPE caches are not in the state dict
                    m.rope_init()
        full = {}
        if self.is_rank_zero:
            model = (self._model_from_folder(self._resume_folder, torch.float32, cfg)
                     if self._resume_folder is not None else self._source)
            full = {f"student.{k}": v.to(self.device, torch.float32) for k, v in model.state_dict().items()}
        set_model_state_dict(self.step, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                        strict=True))
        training.validate_no_params_on_meta_device(self.step)
        self._source = None
        torch.distributed.barrier()

    # ---- data -----------------------------------------------------------------------------------
    def _setup_data(self, cfg: DictConfig) -> None:
        from torchdata.stateful_dataloader import StatefulDataLoader
        from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
        from torch.utils.data import ConcatDataset

        parts = cfg.dataset if isinstance(cfg.dataset, ListConfig) else [cfg.dataset]
        datasets = []
        for part in parts:
            if part.get("packed", False):
                raise RecipeError("dataset.packed=true: leave packing to the recipe (it needs document ids); set "
                                  "packed: false and choose max_seq_len / split_across_rows at the top level")
            datasets.append(_instantiate(part, "dataset", self.tokenizer))
        ds = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
        rows_needed = self.max_steps * self.grad_accum * self.batch_size * self.world_size
        self.packed = dms_data.PackedDocuments(ds, int(cfg.max_seq_len), pad_id=self.tokenizer.pad_id,
                                               split_across_rows=bool(cfg.get("split_across_rows", True)),
                                               max_rows=rows_needed, progress=self.is_rank_zero)
        self.data_fingerprint = self.packed.fingerprint()
        per_batch = self.batch_size * self.world_size
        if len(self.packed) < per_batch:
            raise RecipeError(f"the data packs into {len(self.packed)} row(s) of {cfg.max_seq_len} tokens, fewer than "
                              f"one batch ({self.batch_size} x {self.world_size} rank(s)): add data or lower "
                              f"max_seq_len / batch_size")
        self.sampler = StatefulDistributedSampler(self.packed, num_replicas=self.world_size, rank=self.rank,
                                                  shuffle=bool(cfg.get("shuffle", True)), seed=self.seed,
                                                  drop_last=True)
        self.dataloader = StatefulDataLoader(self.packed, batch_size=self.batch_size, sampler=self.sampler,
                                             drop_last=True, num_workers=0)
        # the same number of eval rows on every rank (FSDP runs every forward on all ranks together)
        n_eval = min(int(cfg.get("eval_batches", 1)) * self.batch_size, len(self.packed) // self.world_size)
        rows = [self.rank + self.world_size * k for k in range(n_eval)]
        self.eval_batches = [torch.utils.data.default_collate([self.packed[i] for i in rows[s:s + self.batch_size]])
                             for s in range(0, len(rows), self.batch_size)]
        epochs = rows_needed / max(len(self.packed), 1)
        self._log(f"data: {self.packed.documents} documents, {self.packed.real_tokens} tokens in {len(self.packed)} "
                  f"rows of {cfg.max_seq_len}; {self.max_steps} steps x {self.grad_accum * self.batch_size} rows x "
                  f"{self.world_size} rank(s) = {max(epochs, 1.0):.1f} epoch(s)")

    def _batches(self):
        """Batches forever, epoch after epoch; resumes where the data loader's state says."""
        while True:
            self.sampler.set_epoch(self.epoch)
            for batch in self.dataloader:
                yield batch
            self.epoch += 1

    # ------------------------------------------------------------------------ training
    def train(self) -> None:
        from torchtune import training
        from tqdm import tqdm


        if self.global_step == 0:
            before = self.measure_compression()
            self._log(f"before training (hard decisions): {before.format()}")
            self._log_dict({"eval_cr": before.ratio}, step=0)
        autocast = (torch.autocast(self.device.type, dtype=self.compute_dtype)
                    if self.compute_dtype != torch.float32 else nullcontext())
        batches = self._batches()
        pbar = tqdm(total=self.max_steps, initial=self.global_step, disable=not self.is_rank_zero, dynamic_ncols=True)
        if self.device.type == "cuda":
            training.cleanup_before_training()
        self.optimizer.zero_grad(set_to_none=True)
        while self.global_step < self.max_steps:
            t0 = time.perf_counter()
            # a tensor, not a float: a compiled step would otherwise recompile for every new value
            alpha_target = torch.tensor(self.dms.alpha_target(self.global_step), device=self.device)
            sums = torch.zeros(3, device=self.device)  # kd, compression, lm
            kept = seen = 0
            tokens = 0
            for _ in range(self.grad_accum):
                batch = {k: v.to(self.device) for k, v in next(batches).items()}
                with autocast:
                    r = self.train_step(batch["tokens"], batch["targets"], batch["doc_ids"], batch["valid"],
                                        alpha_target, self.noise)
                ((r["kd"] + r["compression"]) / self.grad_accum).backward()
                sums += torch.stack([r["kd"].detach(), r["compression"].detach(), r["lm"].detach()]).float()
                k, n = kept_tokens(r["evicted"], batch["doc_ids"], batch["valid"], self.dms.effective_window)
                kept, seen = kept + k, seen + n
                tokens += int(batch["valid"].sum())
            grad_norm = None
            if self.clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.step.parameters() if p.requires_grad],
                                                           max_norm=float(self.clip))
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.global_step += 1

            stats = torch.cat([sums / self.grad_accum, kept.flatten(), seen.view(1),
                               torch.tensor([float(tokens)], device=self.device)])
            if self.distributed:
                torch.distributed.all_reduce(stats)
                stats[:3] /= self.world_size
            kd, comp, lm = stats[:3].tolist()
            per_layer_head = (stats[3:-2].view_as(kept) / stats[-2]).cpu()
            report = CompressionReport(per_layer_head=per_layer_head)
            target_cr = self.dms.target_cr(self.global_step - 1)
            pbar.update(1)
            pbar.set_postfix_str(f"kd {kd:.4f} comp {comp:.4f} CR {report.ratio:.2f} (target {target_cr:.2f})")
            if self.global_step % self.log_every == 0 or self.global_step == self.max_steps:
                dt = time.perf_counter() - t0
                log = {"loss": kd + comp, "kd_loss": kd, "compression_loss": comp, "lm_loss": lm,
                       "target_cr": target_cr, "achieved_cr": report.ratio,
                       "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_second": stats[-1].item() / dt}
                if grad_norm is not None:
                    log["grad_norm"] = float(grad_norm)
                log.update(peak_memory(self.device))
                log.update({f"kept_layer_{i:02d}": float(v) for i, v in enumerate(per_layer_head.mean(dim=1))})
                self._log_dict(log, step=self.global_step)
            if self.save_every and self.global_step % int(self.save_every) == 0 and self.global_step < self.max_steps:
                self.save_checkpoint(self.global_step, final=False)
        pbar.close()
        mem = peak_memory(self.device)
        self._log("MEASURED peak memory of training on this rank: " + ", ".join(
            f"{k.replace('peak_', '').replace('_GiB', '')} {v:.2f} GiB" for k, v in mem.items()))
        after = self.measure_compression()
        self._log(f"after {self.global_step} steps (hard decisions): {after.format()}")
        self._log_dict({"eval_cr": after.ratio}, step=self.global_step)
        self.save_checkpoint(self.global_step, final=True)
        if self.is_rank_zero:
            try:
                self._claim("kept_heatmap.png")
                path = plot_kept_heatmap(after, str(self.output_dir / "kept_heatmap.png"),
                                         title=f"kept, step {self.global_step}")
                self._log(f"heat map of kept fraction per layer and KV head: {path}")
            except ImportError:
                self._log("no heat map: it needs matplotlib (pip install matplotlib)")

    @torch.no_grad()
    def measure_compression(self) -> CompressionReport:
        """CR of the hard decisions (as at inference) on the fixed eval rows, all ranks together."""
        was = self.step.training
        self.step.eval()
        autocast = (torch.autocast(self.device.type, dtype=self.compute_dtype)
                    if self.compute_dtype != torch.float32 else nullcontext())
        kept = seen = 0
        for batch in self.eval_batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with autocast:
                evicted = self.step.measure(batch["tokens"], batch["doc_ids"])
            k, n = kept_tokens(evicted, batch["doc_ids"], batch["valid"], self.dms.effective_window)
            kept, seen = kept + k, seen + n
        stats = torch.cat([kept.flatten(), seen.view(1)])
        if self.distributed:
            torch.distributed.all_reduce(stats)
        self.step.train(was)
        return CompressionReport(per_layer_head=(stats[:-1].view_as(kept) / stats[-1]).cpu())

    # ------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, final: bool) -> Optional[Path]:
        """step_NNNNNN/: fp32 weights + recipe_state.pt (exact resume); final/: weights in save_dtype.
        Both are Hugging Face folders with the DMS settings in config.json (written atomically)."""
        from torchtune import training

        if self.distributed:
            sd = training.gather_cpu_state_dict(self.step, self.is_rank_zero, device=self.device)
            opt = None if final else training.get_full_optimizer_state_dict(self.step, self.optimizer,
                                                                            self.is_rank_zero, device=self.device)
            rng = [None] * self.world_size
            torch.distributed.all_gather_object(rng, self._rng_state())
        else:
            sd = self.step.state_dict()
            # a quantized base is saved as the full-precision weights it was quantized from
            sd = {k: self._base_originals[k] if k in self._base_originals else v for k, v in sd.items()}
            opt = None if final else self.optimizer.state_dict()
            rng = [self._rng_state()]
        folder = None
        if self.is_rank_zero:
            folder = self.output_dir / ("final" if final else f"step_{step:06d}")
            dtype = self.save_dtype if final else torch.float32
            weights = {k.removeprefix("student."): (v.to(dtype) if v.is_floating_point() and not ckpt.is_extra_key(k)
                                                    else v.float() if v.is_floating_point() else v)
                       for k, v in sd.items()}
            view = _StateDictView(weights)
            hf_config = {**self.hf_config, **self.dms.to_hf()}
            if self.kv_int8:  # informational: generate defaults --kv to int8
                hf_config["dms_kv_dtype"] = "int8"
            if self.base_weights != "none":  # informational: generate defaults --weight-quant to it
                hf_config["dms_weight_quant"] = self.base_weights
            record = {"recipe": "dms_retrofit", "run_id": self.run_id, "step": step, "settings": self.settings,
                      "data": self.data_fingerprint, "world_size": self.world_size}
            state = None
            if not final:
                state = {"step": step, "epoch": self.epoch, "dataloader": self.dataloader.state_dict(),
                         "optimizer": opt, "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
                         "rng": rng, "world_size": self.world_size, "seed": self.seed, "dms": self.dms.to_dict(),
                         "run": record}

            def extra_files(tmp: Path) -> None:  # written with the weights: the folder appears whole or not at all
                if state is not None:
                    torch.save(state, tmp / RECIPE_STATE)
                (tmp / RUN_RECORD).write_text(json.dumps(record, indent=1) + "\n")

            self._claim(folder.name)
            try:
                ckpt.save_hf_checkpoint(view, hf_config, folder, self.family,
                                        extra_state=pretrained.dms_state_dict(view), tokenizer=self.tokenizer.hf,
                                        extra_files=extra_files, carry_over=final)
            except ValueError as e:
                raise RecipeError(f"cannot save {folder}: {e}") from None
            self._log(f"saved {'final model' if final else 'checkpoint'} to {folder}")
        if self.distributed:
            torch.distributed.barrier()
        return folder

    def _claim(self, name: str, replace: bool = True) -> None:
        """Record in output_dir's run record that the recipe writes `name` there (rank 0), refusing an
        entry the recipe did not write (one that appeared after start-up) unless overwrite=true, which
        removes it first when `replace`."""
        if name in self.manifest["written"]:
            return
        path = self.output_dir / name
        ours = path.is_dir() and _STEP_RE.match(name) and (path / RUN_RECORD).is_file()
        if (path.exists() or path.is_symlink()) and not ours:
            if not self.overwrite:
                raise RecipeError(f"{path} was not written by this recipe (it appeared during the run): refusing to "
                                  f"replace it; move it away and resume with resume_from=latest, or pass "
                                  f"overwrite=true")
            if replace:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        self.manifest["written"] = sorted(set(self.manifest["written"]) | {name})
        self._save_manifest()

    def _save_manifest(self) -> None:
        data = {"recipe": "dms_retrofit", "run_id": self.manifest.get("run_id"), "written": self.manifest["written"]}
        tmp = self.output_dir / f".{RUN_RECORD}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.output_dir / RUN_RECORD)

    # ---- resume ----------------------------------------------------------------------------------
    def _choose_resume_folder(self, value) -> Optional[Path]:
        """The checkpoint to resume (None: a new run); its recipe state and run record are kept in
        self._resume_state / self._resume_record. A checkpoint must be intact and of this run: the
        settings that change the result equal (RESULT_KEYS; the data are checked once loaded) and its
        step not past max_steps. `latest`: the newest intact checkpoint in output_dir of the run
        started there last (any run, when output_dir records none)."""
        self._resume_state = self._resume_record = None
        if value in (None, "", False):
            return None
        if str(value) == "latest":
            return self._latest_checkpoint()
        folder = Path(os.path.expanduser(str(value))).absolute()
        if not (folder / RECIPE_STATE).is_file():
            raise RecipeError(f"resume_from={value}: {folder} holds no {RECIPE_STATE}; resume from a step_NNNNNN "
                              f"folder that a run wrote (final/ is not resumable)")
        problem, state = checkpoint_problem(folder)
        if problem:
            raise RecipeError(f"cannot resume from {folder}: {problem}")
        self._accept_checkpoint(folder, state)
        return folder

    def _latest_checkpoint(self) -> Path:
        steps = sorted((p for p in self.output_dir.glob("step_*") if p.is_dir() and _STEP_RE.match(p.name)),
                       key=lambda p: int(p.name[5:]), reverse=True)
        run_id = self.manifest.get("run_id")
        others, damaged = [], []
        for folder in steps:
            record = read_record(folder)
            if record is None:
                others.append(f"{folder.name} (no {RUN_RECORD}: "
                              f"{'written by an older version' if (folder / RECIPE_STATE).is_file() else 'incomplete'})")
                continue
            if run_id is not None and record.get("run_id") != run_id:
                others.append(f"{folder.name} (run {record.get('run_id')})")
                continue
            problem, state = checkpoint_problem(folder)
            if problem:
                self._log(f"warning: {folder} is damaged ({problem}); looking for an older intact checkpoint")
                damaged.append(folder.name)
                continue
            if damaged:
                self._log(f"resume_from=latest: {', '.join(damaged)} damaged: falling back to {folder.name}, the "
                          f"newest intact checkpoint of this run")
            self._accept_checkpoint(folder, state)
            return folder
        whose = f"run {run_id}, the run last started there," if run_id else "any run"
        raise RecipeError(
            f"resume_from=latest: no intact checkpoint of {whose} in {self.output_dir}"
            + (f"; damaged: {', '.join(damaged)}" if damaged else "")
            + (f"; other checkpoints there: {', '.join(others[:4])}: resume one with resume_from=PATH (its settings "
               f"must equal this run's)" if others else "")
            + "; or leave resume_from out to start a new run")

    def _accept_checkpoint(self, folder: Path, state: Dict[str, Any]) -> None:
        record = state.get("run") or read_record(folder)
        step = int(state["step"])
        if step > self.max_steps:
            raise RecipeError(f"cannot resume from {folder}: it is at step {step}, past max_steps={self.max_steps} "
                              f"(a checkpoint of another run?)")
        if record is None:
            self._log(f"warning: {folder} was written before runs were recorded: only its DMS settings can be "
                      f"checked against this run's")
        else:
            diff = settings_diff(record.get("settings", {}), self.settings)
            if diff:
                raise RecipeError(f"cannot resume from {folder}: it belongs to a run with other settings "
                                  f"({'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''}); resume with that run's "
                                  f"settings, or start a new run (leave resume_from out)")
        self._resume_state, self._resume_record = state, record

    def _rng_state(self) -> Dict[str, Any]:
        import random

        import numpy as np

        return {"noise": self.noise.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
                "python": random.getstate(), "numpy": np.random.get_state()}

    def _load_recipe_state(self, folder: Path) -> None:
        import random

        import numpy as np

        state = self._resume_state  # read (mmap: only rank 0 reads the optimizer tensors) when it was chosen
        run = state.get("run")
        if run is not None and run.get("data", {}).get("sha256") != self.data_fingerprint["sha256"]:
            then, now = run.get("data", {}), self.data_fingerprint
            raise RecipeError(f"cannot resume from {folder}: its run trained on other data ({_describe_data(then)}) "
                              f"than this config gives ({_describe_data(now)}): the dataset files or the data "
                              f"settings changed; resume with that run's data, or start a new run")
        if state["dms"] != self.dms.to_dict():
            diff = {k: (v, self.dms.to_dict()[k]) for k, v in state["dms"].items() if self.dms.to_dict()[k] != v}
            raise RecipeError(f"cannot resume from {folder}: its DMS settings differ from the config's "
                              f"(checkpoint, config): {diff}")
        if state["world_size"] != self.world_size:
            self._log(f"warning: {folder} was written by {state['world_size']} rank(s), this run has "
                      f"{self.world_size}: the data order and noise will differ from an uninterrupted run")
        self.global_step, self.epoch = int(state["step"]), int(state["epoch"])
        if self.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.step, self.optimizer, state["optimizer"] if self.is_rank_zero else {},
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.sampler.set_epoch(self.epoch)
        self.dataloader.load_state_dict(state["dataloader"])
        rng = state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0]
        self.noise.set_state(rng["noise"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        self._log(f"resumed from {folder} at step {self.global_step} (target CR {self.dms.target_cr(self.global_step):.2f})")

    # ------------------------------------------------------------------------ logging, cleanup
    def _log(self, msg: str) -> None:
        if self.is_rank_zero:
            from tqdm import tqdm

            tqdm.write(f"dms_retrofit: {msg}", file=sys.stdout)  # not into the progress bar's line
            sys.stdout.flush()

    def _log_dict(self, payload: Dict[str, float], step: int) -> None:
        if self.is_rank_zero:
            self.metric_logger.log_dict(payload, step=step)

    def cleanup(self) -> None:
        if self.is_rank_zero and hasattr(self, "metric_logger"):
            self.metric_logger.close()
        if self.distributed:
            torch.distributed.destroy_process_group()


# ============================================================================ helpers
class _StateDictView:
    """What save_hf_checkpoint and dms_state_dict read from a model: its state dict. Lets a gathered
    (FSDP) or re-typed state dict be saved without building a second model."""

    def __init__(self, sd: Dict[str, torch.Tensor]):
        self._sd = sd

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self._sd


def peak_memory(device: torch.device) -> Dict[str, float]:
    """Measured peak memory so far, in GiB: on CUDA the caching allocator's peak allocated and
    reserved bytes of this device; elsewhere the process's peak resident set size."""
    if device.type == "cuda":
        return {"peak_cuda_allocated_GiB": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_cuda_reserved_GiB": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    return {"peak_process_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def _device(name: str, distributed: bool) -> torch.device:
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError("device=cuda but torch sees no CUDA device: use device=cpu (or auto)")
        if distributed:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    return torch.device(name)


def _hf_config_of(model: nn.Module, tokenizer) -> Dict[str, Any]:
    """config.json for a decoder built from a Llama component builder (random init)."""
    from torchtune.modules import RotaryPositionalEmbeddings

    attn = model.layers[0].attn
    if type(attn.pos_embeddings) is not RotaryPositionalEmbeddings:
        raise RecipeError("random initialisation (checkpoint_dir: null) supports Llama builders with plain RoPE, "
                          "e.g. torchtune.models.llama3._component_builders.llama3")
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "vocab_size": model.tok_embeddings.num_embeddings, "hidden_size": model.tok_embeddings.embedding_dim,
          "num_hidden_layers": len(model.layers), "num_attention_heads": attn.num_heads,
          "num_key_value_heads": attn.num_kv_heads, "intermediate_size": model.layers[0].mlp.w1.out_features,
          "rms_norm_eps": float(model.norm.eps), "rope_theta": float(attn.pos_embeddings.base),
          "max_position_embeddings": int(model.max_seq_len),
          "tie_word_embeddings": hasattr(model.output, "tied_module"),
          "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    expected = ckpt.build_expected_hf_shapes(hf)
    if sum(math.prod(s) for s in expected.values()) != sum(p.numel() for p in model.parameters()):
        raise RecipeError("the `model` component has parameters a Llama config.json cannot describe")
    return hf


def _instantiate(node, what: str, *args, **kwargs):
    from torchtune.config._errors import InstantiationError

    try:
        return config.instantiate(node, *args, **kwargs)
    except InstantiationError as e:
        raise RecipeError(f"cannot build {what} ({node.get('_component_')}): {e}") from None
    except ModuleNotFoundError as e:
        raise RecipeError(f"cannot build {what}: {e}") from None
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise RecipeError(f"cannot build {what} ({node.get('_component_')}): {e}") from None


def result_settings(cfg: DictConfig, dms: DMSConfig, kv_int8: bool, base_weights: str) -> Dict[str, Any]:
    """The settings that change a run's result (RESULT_KEYS), as JSON values: recorded in every
    checkpoint, and equal in a run that resumes it."""
    out: Dict[str, Any] = {}
    for key in RESULT_KEYS:
        node = cfg.get(key, _RESULT_DEFAULTS.get(key))
        out[key] = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
    out["dms"] = dms.to_dict()  # defaults filled in: an omitted field equals its default
    out["quant"] = {"kv_int8": kv_int8, "base_weights": base_weights}
    return json.loads(json.dumps(out, default=str))


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict) and value:
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def settings_diff(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    """`key=value in the checkpoint, value now` for every setting that differs (dotted keys)."""
    a, b = _flatten(saved), _flatten(now)
    missing = object()
    return [f"{k}={a.get(k, '(unset)')!r} there, {b.get(k, '(unset)')!r} now" for k in sorted(a.keys() | b.keys())
            if a.get(k, missing) != b.get(k, missing)]


def _describe_data(d: Dict[str, Any]) -> str:
    return (f"{d.get('documents', '?')} documents, {d.get('tokens', '?')} tokens in {d.get('rows', '?')} rows, "
            f"hash {str(d.get('sha256', '?'))[:12]}")


def read_record(folder: Path) -> Optional[Dict[str, Any]]:
    """The run record of a checkpoint folder (None when missing or unreadable)."""
    try:
        record = json.loads((folder / RUN_RECORD).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "run_id" in record else None


def checkpoint_problem(folder: Path) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """(None, its recipe state) for an intact step folder; (what is wrong, None) for a damaged one
    (config.json, weights files or recipe_state.pt unreadable, e.g. truncated by a kill or a full disk)."""
    from safetensors import safe_open

    try:
        ckpt.read_hf_config(folder)
        for f in ckpt.weight_files(folder):
            with ckpt.safetensors_errors(f), safe_open(str(f), "pt"):
                pass
    except (FileNotFoundError, ValueError) as e:
        return str(e), None
    try:
        # mmap: only what is used is read (rank 0 reads the optimizer tensors, the others get their shards)
        state = torch.load(folder / RECIPE_STATE, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises (zip, pickle, mmap errors)
        return f"{folder / RECIPE_STATE} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", None
    if not isinstance(state, dict) or "step" not in state:
        return f"{folder / RECIPE_STATE} is not a recipe state of dms_retrofit", None
    return None, state


def read_manifest(output_dir: Path) -> Dict[str, Any]:
    path = output_dir / RUN_RECORD
    manifest = {"run_id": None, "written": [], "foreign": []}
    if not path.is_file():
        return manifest
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if not (isinstance(data, dict) and data.get("recipe") == "dms_retrofit"
                and isinstance(data.get("written", []), list)):
            raise ValueError("not a run record of dms_retrofit")
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path} is damaged ({e}): it records what this recipe wrote in {output_dir}; use a new "
                          f"output_dir, or delete the file and pass overwrite=true") from None
    manifest.update(run_id=data.get("run_id"), written=[str(n) for n in data.get("written", [])])
    return manifest


def check_output_dir(output_dir: Path, overwrite: bool) -> Dict[str, Any]:
    """output_dir's run record, once output_dir is known to hold nothing but what this recipe wrote
    there (its run record lists it; step folders copied in to resume carry their own), or with
    overwrite=true: RecipeError otherwise, before anything is built or written."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RecipeError(f"output_dir={output_dir} is a file: give a folder (a new one, or one this recipe wrote)")
    manifest = read_manifest(output_dir)
    if not output_dir.is_dir():
        return manifest
    foreign = []
    for entry in sorted(output_dir.iterdir()):
        temp = ckpt.TEMP_NAME_RE.match(entry.name)
        if entry.name in (RUN_RECORD, *manifest["written"]) or (temp and _OURS_RE.match(temp.group("name"))):
            continue
        if entry.is_dir() and _STEP_RE.match(entry.name) and (entry / RUN_RECORD).is_file():
            continue  # a checkpoint of this recipe, copied here to be resumed
        foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    if foreign and not overwrite:
        raise RecipeError(f"output_dir={output_dir} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} this "
                          f"recipe did not write ({', '.join(foreign[:6])}{', ...' if len(foreign) > 6 else ''}): "
                          f"refusing to write there; choose a new or empty output_dir, or pass overwrite=true to "
                          f"let this run replace what it writes (final/, step_NNNNNN/, kept_heatmap.png)")
    manifest["foreign"] = foreign
    return manifest


def clean_leftovers(output_dir: Path, log) -> None:
    """Remove what an interrupted save left in output_dir (the temporary folders and files of an
    atomic save); a folder that was being replaced and is missing gets its previous version back."""
    removed, restored = [], []

    def remove(path: Path) -> None:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    for entry in sorted(output_dir.iterdir()):
        temp = ckpt.TEMP_NAME_RE.match(entry.name)
        if temp and _OURS_RE.match(temp.group("name")):
            target = output_dir / temp.group("name")
            if temp.group("kind") == "old" and entry.is_dir() and not target.exists():
                os.rename(entry, target)
                restored.append(target.name)
            else:
                remove(entry)
                removed.append(entry.name)
        elif entry.is_dir() and (_STEP_RE.match(entry.name) or entry.name == "final"):
            for inner in sorted(entry.iterdir()):
                if ckpt.TEMP_NAME_RE.match(inner.name):
                    remove(inner)
                    removed.append(f"{entry.name}/{inner.name}")
    if restored:
        log(f"restored {', '.join(restored)} (a save was interrupted while it replaced them)")
    if removed:
        log(f"removed what an interrupted save left in {output_dir}: {', '.join(removed)}")


def _missing_weights_message(cfg: DictConfig, folder: Path) -> str:
    name = _CONFIG_NAME or "this config"
    repo = cfg.get("hf_repo", None) or "<organisation>/<model>"
    return (f"config '{name}' expects the Hugging Face-format weights of {repo} in\n"
            f"    {folder}\n"
            f"but {'that folder has no config.json or weights' if folder.is_dir() else 'that folder does not exist'}.\n"
            f"Get them (gated models need a Hugging Face token with access) with:\n"
            f"    tune download {repo} --output-dir {folder} --hf-token $HF_TOKEN\n"
            f"The folder must hold config.json, model*.safetensors (with model.safetensors.index.json when sharded) "
            f"and the tokenizer files; Meta's original/ files that `tune download` adds are not used.\n"
            f"Weights elsewhere: add checkpoint_dir=/path/to/folder to the command.")


_KNOWN_KEYS = {
    "hf_repo", "checkpoint_dir", "model", "tokenizer", "dataset", "max_seq_len", "split_across_rows", "shuffle",
    "seed", "dms", "train_adapter_only", "optimizer", "lr_scheduler", "clip_grad_norm", "batch_size",
    "gradient_accumulation_steps", "max_steps", "dtype", "device", "enable_activation_checkpointing", "compile",
    "kd_chunk_size", "kd_temperature", "log_lm_loss", "output_dir", "save_every_n_steps", "save_dtype",
    "resume_from", "eval_batches", "metric_logger", "log_every_n_steps", "fsdp_reshard_after_forward", "quant",
    "overwrite",
}
BASE_WEIGHT_QUANT = ("none", "int8", "nf4")


def _quant_settings(cfg: DictConfig) -> Tuple[bool, str]:
    """The `quant:` section: kv_int8 (bool, default false), base_weights (none|int8|nf4, default none)."""
    q = cfg.get("quant", None)
    if q is None:
        return False, "none"
    if not isinstance(q, DictConfig):
        raise RecipeError("quant must be a mapping: {kv_int8: true|false, base_weights: none|int8|nf4}")
    unknown = sorted(set(q.keys()) - {"kv_int8", "base_weights"})
    if unknown:
        raise RecipeError(f"unknown key(s) quant.{', quant.'.join(unknown)}; quant takes kv_int8 (true|false) and "
                          f"base_weights ({'|'.join(BASE_WEIGHT_QUANT)})")
    kv = q.get("kv_int8", False)
    if not isinstance(kv, bool):
        raise RecipeError(f"quant.kv_int8={kv!r} is invalid: it must be true or false")
    base = q.get("base_weights", "none")
    base = "none" if base is None else str(base)
    if base not in BASE_WEIGHT_QUANT:
        raise RecipeError(f"quant.base_weights={base!r} is invalid: it must be one of {'|'.join(BASE_WEIGHT_QUANT)}")
    return kv, base


def capacity_estimate(hf: Dict[str, Any], base_weights: str, dms: DMSConfig, cfg: DictConfig) -> str:
    """A rough, clearly labelled ESTIMATE of one device's memory for an adapter-only retrofit on a
    quantized frozen base (not measured): weights as stored, the adapter's fp32 master weights, grads
    and Adam state, and activations of one micro-batch."""
    L, d, V = int(hf["num_hidden_layers"]), int(hf["hidden_size"]), int(hf["vocab_size"])
    ff, H, Hkv = int(hf["intermediate_size"]), int(hf["num_attention_heads"]), int(hf["num_key_value_heads"])
    hd = int(hf.get("head_dim") or d // H)
    linear = L * (d * H * hd + 2 * d * Hkv * hd + H * hd * d + 3 * d * ff)
    out_proj = 0 if hf.get("tie_word_embeddings") else V * d
    per_param = {"int8": 1.0 + 4 / d, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}[base_weights]  # values + scales
    plain_bytes = 2 * (V * d + L * 2 * d + d)  # embeddings and norms stay in the compute dtype
    weights = (linear + out_proj) * per_param + plain_bytes
    adapter = L * (d * Hkv + d) if dms.decision == "adapter" else 0  # per layer: RMSNorm + Linear(d, Hkv)
    optim = adapter * 4 * 4  # fp32 master weight, gradient, Adam exp_avg and exp_avg_sq
    tokens = int(cfg.batch_size) * int(cfg.max_seq_len)
    ckpt_on = bool(cfg.get("enable_activation_checkpointing", False))
    # bf16 activations: with checkpointing one saved input per layer plus one layer's working set
    # (q, k, v, attention output, MLP hidden x 3); without it every layer's working set is kept
    layer_set = tokens * 2 * (d + H * hd + 2 * Hkv * hd + d + 3 * ff)
    acts = tokens * 2 * d * L + layer_set if ckpt_on else layer_set * L
    # dense masked attention scores (CPU path; the GPU flex path does not materialise them) are
    # left out; the chunked distillation holds two fp32 logit chunks of kd_chunk_size x vocab
    kd = 2 * 2 * int(cfg.get("kd_chunk_size", 1024)) * V * 4
    total = weights + optim + acts + kd
    gib = 2 ** 30
    return (f"ESTIMATE (not a measurement) of one device's memory for this adapter-only retrofit on a "
            f"{base_weights} base: weights {weights / gib:.2f} GiB ({(linear + out_proj) / 1e9:.2f}B quantized "
            f"linear params at ~{per_param:.2f} B/param + embeddings/norms in bf16); adapter {adapter:,} params, "
            f"fp32 weights+grads+Adam {optim / 2**20:.1f} MiB; activations ~{acts / gib:.2f} GiB "
            f"({tokens} tokens/micro-batch, bf16, activation checkpointing {'on' if ckpt_on else 'off'}); "
            f"distillation logit chunks ~{kd / gib:.2f} GiB; total ~{total / gib:.1f} GiB before allocator and "
            f"CUDA context overhead: a lower bound. Measured for SmolLM2-135M on an H200 (RESULTS.md 16), the "
            f"real peak was ~1.5x this total in eager mode and ~1.25x with compile=true")


def _validate(cfg: DictConfig) -> None:
    """Clear errors for the recipe's own keys before anything is built."""
    for key in cfg:
        node = cfg.get(key)
        if key not in _KNOWN_KEYS and not (isinstance(node, DictConfig) and "_component_" in node):
            raise RecipeError(f"unknown config key {key!r}; the recipe reads {sorted(_KNOWN_KEYS)} (and building "
                              f"blocks with a _component_)")
    for key in ("tokenizer", "dataset", "optimizer", "metric_logger", "dms", "max_seq_len", "max_steps",
                "batch_size", "gradient_accumulation_steps", "output_dir", "dtype"):
        if cfg.get(key, None) is None:
            raise RecipeError(f"the config lacks {key!r}")

    def positive_int(key):
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RecipeError(f"{key}={v!r} is invalid: it must be an integer >= 1")

    for key in ("max_seq_len", "max_steps", "batch_size", "gradient_accumulation_steps"):
        positive_int(key)
    for key in ("save_every_n_steps",):
        if cfg.get(key, None) is not None:
            positive_int(key)
    for key, allowed in (("dtype", ("bf16", "fp32")), ("save_dtype", ("bf16", "fp32"))):
        if cfg.get(key, "bf16") not in allowed:
            raise RecipeError(f"{key}={cfg.get(key)!r} is invalid: it must be one of {allowed}")
    if not isinstance(cfg.get("overwrite", False), bool):
        raise RecipeError(f"overwrite={cfg.get('overwrite')!r} is invalid: it must be true or false")
    clip = cfg.get("clip_grad_norm", None)
    if clip is not None and not (isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0):
        raise RecipeError(f"clip_grad_norm={clip!r} is invalid: it must be a number > 0 or null")
    if not isinstance(cfg.dms, DictConfig):
        raise RecipeError("dms must be a mapping of DMSConfig fields (window, decision, final_cr, ...)")
    DMSConfig.from_dict(OmegaConf.to_container(cfg.dms, resolve=True))  # raises DMSConfigError with the field


def _resolve_paths(cfg: DictConfig) -> None:
    """`checkpoint_dir: smollm2` is the embedded model; paths get `~` expanded (interpolations such as
    ${checkpoint_dir} then see the resolved value)."""
    cfg.output_dir = str(Path(os.path.expanduser(str(cfg.output_dir))).absolute())
    value = cfg.get("checkpoint_dir", None)
    if value is not None:
        try:
            cfg.checkpoint_dir = str(dms_data.resolve_model_dir(value))
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise RecipeError(str(e)) from None


def packaged_configs() -> List[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _map_config_argument(argv: List[str]) -> List[str]:
    """--config NAME -> the packaged yaml when NAME is not a file (torchtune passes it as a path)."""
    global _CONFIG_NAME
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            j, value = i + 1, argv[i + 1]
        elif a.startswith("--config="):
            j, value = i, a.split("=", 1)[1]
        else:
            continue
        _CONFIG_NAME = Path(value).stem
        if not os.path.isfile(value):
            if value in packaged_configs():
                path = str(CONFIG_DIR / f"{value}.yaml")
            elif "/" in value or value.endswith((".yaml", ".yml")):
                raise RecipeError(f"--config {value}: no such file")
            else:
                raise RecipeError(f"--config {value}: not a file and not a packaged config; packaged: "
                                  f"{', '.join(packaged_configs())}")
            argv[j] = path if a == "--config" else f"--config={path}"
        break
    return argv


# ============================================================================ entry point
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """DMS retrofit (see the module docstring). Config keys: the yaml files in dms_flex/configs/."""
    _resolve_paths(cfg)
    recipe = DMSRetrofitRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()


def main() -> None:
    from omegaconf.errors import OmegaConfBaseException

    try:
        sys.argv = _map_config_argument(sys.argv)
        recipe_main()
    except (RecipeError, DMSConfigError, OmegaConfBaseException) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
