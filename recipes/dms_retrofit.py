"""DMS retrofit: teach an existing LLM which KV-cache entries it may drop (docs/design.md, "Losses and schedule").

    tune run dms_retrofit --config llama3_8b                             # one device
    tune run --nproc_per_node 8 dms_retrofit --config llama3_8b          # FSDP2 over 8 GPUs
    tune run dms_retrofit --config smollm2_135m max_steps=50             # key=value overrides
    tune run dms_retrofit --config ./my_retrofit.yaml                    # your own yaml

Bare config names (llama3_8b, llama3_2_1b, smollm2_135m, smollm2_135m_lora, tiny, ...) are the yaml
files shipped in dms_flex/configs/; anything else is a path.

The student is the model with DMS (soft, noisy eviction decisions); the teacher is the same model
with eviction off: the student itself when only the DMS adapter trains (the base is frozen, so the
two coincide), otherwise a frozen copy of the original weights. Per step:

    loss = KL(teacher || student) over next-token distributions   (chunked over the vocabulary)
         + max(0, alpha_target(step) - fraction evicted)           (alpha_target = 1 - 1/CR(step))

with CR(step) rising linearly from dms.initial_cr to dms.final_cr over dms.final_step steps. The
plain LM loss is only logged. Master weights and optimizer state are fp32; with dtype=bf16 the
forward runs under bf16 autocast and the frozen teacher copy is held in bf16.

Borrowed variant: zeroing_steps=N distillation-only steps (eviction off, no compression loss) first
scale the borrowed query channel's weights from 1 to 0 (dms_flex/retrofit/zeroing.py); the CR schedule
then starts, for max_steps more steps (step numbers count both). lora.enabled=true (adapter variant, train_adapter_only=true):
torchtune LoRA on the frozen base trains with the adapter; the teacher is the base without it.

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
same RESULT_KEYS settings, same packed data, step <= zeroing_steps + max_steps.

Benchmarks (dms_flex/retrofit/random_init.py, benchmarks/bench_retrofit.py): benchmark=true saves nothing and writes
benchmark.json (tokens/s per GPU, step-time split, peak memory per rank); random_init=true checkpoint_dir=null
gives the config's architecture random weights and synthetic packed rows, no files needed.

The machinery (config checks, output_dir, run records and resume, checkpoint writing, models, metrics,
memory, timing) lives in dms_flex/retrofit/; this file is the recipe itself, to be read top to bottom.
"""

from __future__ import annotations

import copy
import os
import sys
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Optional

import yaml
import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from dms_flex.checkpoints.lora import apply_lora
from dms_flex.config import DMSConfig, DMSConfigError
from dms_flex.retrofit import models
from dms_flex.retrofit.checkpointing import (
    checkpoint_hf_config,
    checkpoint_weights,
    gather_state,
    load_optimizer_state,
    restore_rng,
    write_checkpoint,
)
from dms_flex.retrofit.config_checks import (
    RecipeError,
    check_distributed,
    check_weights_present,
    instantiate,
    lora_settings,
    map_config_argument,
    resolve_device,
    resolve_paths,
    training_mode,
    validate_config,
    zeroing_steps,
)
from dms_flex.retrofit.data_setup import build_training_data
from dms_flex.retrofit import timing
from dms_flex.retrofit.memory import peak_memory_message
from dms_flex.retrofit.memory_fit import memory_message
from dms_flex.retrofit.metrics import describe_run, kept_tokens, reduce_step, save_heatmap, step_metrics
from dms_flex.retrofit.random_init import benchmark_settings, benchmark_summary, make_tokenizer
from dms_flex.retrofit.output_dir import OutputDir
from dms_flex.retrofit.run_record import check_resumed_state, choose_resume, make_record, result_settings
from dms_flex.retrofit.step import RetrofitStep
from dms_flex.retrofit.zeroing import NeuronZeroing, zeroing_scale
from dms_flex.stats import CompressionReport

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class DMSRetrofitRecipe:
    """Reads top to bottom: __init__ (devices, process group), setup (data, models, optimizer,
    resume), train, save_checkpoint, cleanup."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg)
        self.bench = benchmark_settings(cfg)  # benchmark=true, random_init, synthetic data, timing
        self.dms = DMSConfig.from_dict(OmegaConf.to_container(cfg.dms, resolve=True))
        self.adapter_only, self.kv_int8, self.base_weights = training_mode(cfg, self.dms)
        cfg.quant = {"kv_int8": self.kv_int8, "base_weights": self.base_weights}  # logged in full with the config
        self.zeroing_steps = zeroing_steps(cfg, self.dms)  # phase 1 (borrowed variant only)
        self.lora = lora_settings(cfg, self.dms, self.adapter_only, self.base_weights)
        self.bench_summary = benchmark_summary(cfg, self.adapter_only, self.base_weights, self.lora, self.bench)
        check_weights_present(cfg)
        self.output_dir = Path(os.path.expanduser(str(cfg.output_dir))).absolute()
        self.overwrite = bool(cfg.get("overwrite", False))
        self.out = OutputDir(self.output_dir, self.overwrite)  # checked before anything is written
        self.settings = result_settings(cfg, self.dms, self.kv_int8, self.base_weights, self.zeroing_steps, self.lora)
        from torchtune import training, utils

        self.distributed = training.is_distributed()
        if self.distributed:
            check_distributed(self.base_weights)
        self.device = resolve_device(cfg.get("device", "auto"), self.distributed)
        if self.distributed:
            from torch.distributed import init_process_group

            init_process_group(backend=training.get_distributed_backend(self.device.type))
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        self.compute_dtype = _DTYPES[cfg.dtype]
        self.save_dtype = _DTYPES[cfg.get("save_dtype", "bf16")]
        self.max_steps = int(cfg.max_steps)  # the steps of the CR schedule; phase 1 comes before them
        self.total_steps = self.zeroing_steps + self.max_steps
        self.grad_accum = int(cfg.gradient_accumulation_steps)
        self.batch_size = int(cfg.batch_size)
        self.clip = cfg.get("clip_grad_norm", None)
        self.save_every = None if self.bench.enabled else cfg.get("save_every_n_steps", None)  # saves none
        self.log_every = int(cfg.get("log_every_n_steps", 1))
        self.seed = int(cfg.seed)
        self.global_step = 0
        self.epoch = 0

    # ------------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        torch.manual_seed(self.seed)
        if self.is_rank_zero:
            self.out.prepare(cfg.metric_logger.get("log_dir", None), self._log)
            self.metric_logger = config.instantiate(cfg.metric_logger)
            self.metric_logger.log_config(cfg)
        if self.distributed:
            torch.distributed.barrier()  # leftovers of an interrupted save are gone before any rank looks
        self.tokenizer = make_tokenizer(cfg, self.bench)  # synthetic data: a stand-in that needs no files
        self._setup_models(cfg)
        # a resumed run continues the run id of its checkpoint; a new run gets its own
        self.run_id = ((self._resume.record or {}) if self._resume else {}).get("run_id") or uuid.uuid4().hex[:12]
        if self.is_rank_zero:
            self.out.record_run(self.run_id)
        self._setup_data(cfg)
        trainable = [p for p in self.step.parameters() if p.requires_grad]
        self.optimizer = instantiate(cfg.optimizer, "optimizer", trainable)
        self.lr_scheduler = None
        if cfg.get("lr_scheduler", None) is not None:
            self.lr_scheduler = instantiate(
                cfg.lr_scheduler, "lr_scheduler", self.optimizer, num_training_steps=self.total_steps
            )
        # the noise of the eviction relaxation has its own generator: its state is part of a checkpoint
        self.noise = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + self.rank)
        if self._resume is not None:
            self._load_recipe_state(self._resume.folder)
        self.train_step = torch.compile(self.step) if cfg.get("compile", False) else self.step
        self.timer = timing.make_timer(self.bench, self.device, self.step, compiled=bool(cfg.get("compile", False)))
        n_train, n_all = sum(p.numel() for p in trainable), sum(p.numel() for p in self.step.parameters())
        where = f"{self.world_size} rank(s) on {self.device.type}, {cfg.dtype}"
        self._log(
            describe_run(n_all, n_train, self.dms, self.lora, self.zeroing_steps, self.teacher is not None, where)
        )
        if cfg.get("zeroing_steps", 0) and not self.zeroing_steps:
            self._log(f"zeroing_steps={cfg.zeroing_steps} ignored: dms.decision={self.dms.decision} borrows no channel")

    def _setup_models(self, cfg: DictConfig) -> None:
        """Student (fp32 master weights, DMS attached), teacher, and the checkpoint to resume if any."""
        self._resume = choose_resume(
            cfg.get("resume_from", None), self.output_dir, self.out.run_id, self.settings, self.total_steps, self._log
        )
        dtype = self.compute_dtype if self.distributed else torch.float32  # random_init builds on self.device
        source, self.hf_config, self.family = models.original_model(
            cfg, self.dms, self.tokenizer, self.seed, dtype, self.device
        )
        # phase 1 sets the borrowed rows from the original's (before the teacher copy is cast)
        self.zeroing = NeuronZeroing.capture(source, self.zeroing_steps) if self.zeroing_steps else None
        if self.lora is not None:  # the LoRA factors' initial values (rank 0's source feeds FSDP's shards)
            apply_lora(source, self.lora, seed=self.seed)
        needs_teacher = not self.adapter_only
        teacher = source if needs_teacher else None  # every rank keeps its own copy of the original
        if self.distributed:  # a meta-device student, sharded below; its weights come from rank 0's copy
            student = models.meta_student(cfg, self.hf_config, self.family, self.dms)
            if self.lora is not None:
                apply_lora(student, self.lora)
        elif self._resume is not None:
            student = models.model_from_folder(self._resume.folder, torch.float32, cfg, self.dms, self.lora)
        else:
            student = copy.deepcopy(source) if needs_teacher else source
        if not self.distributed:
            student = student.to(device=self.device, dtype=torch.float32)
        if teacher is not None:
            teacher.to(device=self.device, dtype=self.compute_dtype).eval().requires_grad_(False)
        if self.adapter_only:
            models.freeze_base(student, self.distributed, self.compute_dtype)
        self._log(memory_message(self.hf_config, cfg, self.dms, self.adapter_only, self.base_weights, self.world_size))
        self._base_originals = {}  # a quantized base: the full-precision weights checkpoints save
        if self.base_weights != "none":
            self._base_originals = models.quantize_base(
                student, self.base_weights, self.compute_dtype, self._log, keep=not self.bench.enabled
            )
        self.teacher = teacher
        self.step = RetrofitStep(
            student,
            teacher,
            activation_checkpointing=bool(cfg.get("enable_activation_checkpointing", False)),
            kd_chunk_size=int(cfg.get("kd_chunk_size", 1024)),
            kd_temperature=float(cfg.get("kd_temperature", 1.0)),
            log_lm_loss=bool(cfg.get("log_lm_loss", True)),
            kv_int8=self.kv_int8,
            lora=self.lora is not None,
        )
        if self.distributed:
            models.shard(self.step, self.device, self.world_size, bool(cfg.get("fsdp_reshard_after_forward", True)))
            full = None
            if self.is_rank_zero:
                full = (
                    models.model_from_folder(self._resume.folder, torch.float32, cfg, self.dms, self.lora)
                    if self._resume is not None
                    else source
                )
            models.load_full_state(self.step, student, full, self.device)
        self.step.train()

    def _setup_data(self, cfg: DictConfig) -> None:
        d = build_training_data(
            cfg,
            self.tokenizer,
            total_steps=self.total_steps,
            grad_accum=self.grad_accum,
            batch_size=self.batch_size,
            world_size=self.world_size,
            rank=self.rank,
            seed=self.seed,
            log=self._log,
            synthetic=self.bench if self.bench.synthetic else None,
        )
        self.packed, self.sampler, self.dataloader, self.eval_batches = (
            d.packed,
            d.sampler,
            d.dataloader,
            d.eval_batches,
        )
        self.data_fingerprint = d.fingerprint

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

        if self.global_step == 0 and not self.bench.enabled:
            before = self.measure_compression()
            self._log(f"before training (hard decisions): {before.format()}")
            self._log_dict({"eval_cr": before.ratio}, step=0)
        batches = self._batches()
        pbar = tqdm(total=self.total_steps, initial=self.global_step, disable=not self.is_rank_zero, dynamic_ncols=True)
        if self.device.type == "cuda":
            training.cleanup_before_training()
        self.optimizer.zero_grad(set_to_none=True)
        while self.global_step < self.total_steps:
            t0 = time.perf_counter()
            self.timer.start_step()
            phase1 = self.zeroing is not None and self.zeroing.active(self.global_step)
            if phase1:  # the borrowed channel's rows at this step's scale; distillation only
                self.zeroing.set_weights(self.step.student, self.global_step)
            sums, kept, seen, tokens = self._forward_backward(batches, eviction=not phase1)
            if phase1:
                self.zeroing.zero_grads(self.step.student)
            grad_norm = self._optimizer_step()
            self.global_step += 1
            self._report_step(sums, kept, seen, tokens, grad_norm, t0, pbar)
            self.timer.mark("report")
            self.timer.end_step(tokens, measured=self.global_step > self.bench.warmup_steps)
            if self.save_every and self.global_step % int(self.save_every) == 0 and self.global_step < self.total_steps:
                self.save_checkpoint(self.global_step, final=False)
        pbar.close()
        self._log(peak_memory_message(self.device))
        if self.timer.enabled:  # benchmark.json: tokens/s per GPU, the step-time split, every rank's peak memory
            timing.write_benchmark(self.timer, self.device, self.distributed, self.bench_summary, self.out, self._log)
        if self.bench.enabled:
            return  # a benchmark saves nothing that could pass for a trained model
        after = self.measure_compression()
        self._log(f"after {self.global_step} steps (hard decisions): {after.format()}")
        self._log_dict({"eval_cr": after.ratio}, step=self.global_step)
        self.save_checkpoint(self.global_step, final=True)
        if self.is_rank_zero:
            save_heatmap(after, self.output_dir, self.global_step, self.out.claim, self._log)

    def _forward_backward(self, batches, eviction: bool = True):
        """One optimizer step's micro-batches: loss = KD + compression, gradients accumulated.
        Returns the summed (kd, compression, lm) losses, kept and seen tokens, and real tokens."""
        # a tensor, not a float: a compiled step would otherwise recompile for every new value; the CR
        # schedule starts after phase 1
        alpha_target = torch.tensor(self.dms.alpha_target(self.global_step - self.zeroing_steps), device=self.device)
        sums = torch.zeros(3, device=self.device)  # kd, compression, lm
        kept = seen = 0
        tokens = 0
        for _ in range(self.grad_accum):
            batch = {k: v.to(self.device) for k, v in next(batches).items()}
            self.timer.mark("data")
            with self._autocast():
                r = self.train_step(
                    batch["tokens"],
                    batch["targets"],
                    batch["doc_ids"],
                    batch["valid"],
                    alpha_target,
                    self.noise,
                    eviction=eviction,
                )
            self.timer.mark("forward")
            ((r["kd"] + r["compression"]) / self.grad_accum).backward()
            self.timer.mark("backward")
            sums += torch.stack([r["kd"].detach(), r["compression"].detach(), r["lm"].detach()]).float()
            k, n = kept_tokens(r["evicted"], batch["doc_ids"], batch["valid"], self.dms.effective_window)
            kept, seen = kept + k, seen + n
            tokens += int(batch["valid"].sum())
            self.timer.mark("bookkeeping")
        return sums, kept, seen, tokens

    def _optimizer_step(self) -> Optional[torch.Tensor]:
        """Clip (when clip_grad_norm is set; returns the norm), step the optimizer and the schedule."""
        grad_norm = None
        if self.clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.step.parameters() if p.requires_grad], max_norm=float(self.clip)
            )
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.timer.mark("optimizer")
        return grad_norm

    def _report_step(self, sums, kept, seen, tokens: int, grad_norm, t0: float, pbar) -> None:
        """Losses and achieved CR over all ranks: the progress bar, and every log_every_n_steps the metrics."""
        kd, comp, lm, report, all_tokens = reduce_step(sums / self.grad_accum, kept, seen, tokens, self.distributed)
        target_cr = self.dms.target_cr(self.global_step - 1 - self.zeroing_steps)
        pbar.update(1)
        pbar.set_postfix_str(f"kd {kd:.4f} comp {comp:.4f} CR {report.ratio:.2f} (target {target_cr:.2f})")
        if self.global_step % self.log_every == 0 or self.global_step == self.total_steps:
            dt = time.perf_counter() - t0
            zeroing = {}
            if self.zeroing is not None:
                zeroing = {"zeroing_scale": zeroing_scale(self.global_step - 1, self.zeroing_steps)}
            self._log_dict(
                zeroing
                | step_metrics(
                    kd,
                    comp,
                    lm,
                    target_cr=target_cr,
                    report=report,
                    lr=self.optimizer.param_groups[0]["lr"],
                    tokens_per_second=all_tokens / dt,
                    grad_norm=grad_norm,
                    device=self.device,
                ),
                step=self.global_step,
            )

    def _autocast(self):
        return (
            torch.autocast(self.device.type, dtype=self.compute_dtype)
            if self.compute_dtype != torch.float32
            else nullcontext()
        )

    @torch.no_grad()
    def measure_compression(self) -> CompressionReport:
        """CR of the hard decisions (as at inference) on the fixed eval rows, all ranks together."""
        was = self.step.training
        self.step.eval()
        kept = seen = 0
        for batch in self.eval_batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast():
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
        sd, opt, rng = gather_state(  # full on rank 0; the optimizer state for step folders only
            self.step, self.optimizer, self.noise, self.device, self.distributed, self.is_rank_zero,
            self.world_size, self._base_originals, with_optimizer=not final,
        )  # fmt: skip
        folder = None
        if self.is_rank_zero:
            folder = self.output_dir / ("final" if final else f"step_{step:06d}")
            weights = checkpoint_weights(sd, self.save_dtype if final else torch.float32)
            hf_config = checkpoint_hf_config(self.hf_config, self.dms, self.kv_int8, self.base_weights, self.lora)
            record = make_record(self.run_id, step, self.settings, self.data_fingerprint, self.world_size)
            state = None if final else dict(  # recipe_state.pt
                step=step, epoch=self.epoch, dataloader=self.dataloader.state_dict(), optimizer=opt, rng=rng,
                lr_scheduler=self.lr_scheduler.state_dict() if self.lr_scheduler else None,
                world_size=self.world_size, seed=self.seed, dms=self.dms.to_dict(), run=record,
            )  # fmt: skip
            self.out.claim(folder.name)
            write_checkpoint(folder, weights, hf_config, self.family, self.tokenizer.hf, state, record, final)
            self._log(f"saved {'final model' if final else 'checkpoint'} to {folder}")
        if self.distributed:
            torch.distributed.barrier()
        return folder

    def _load_recipe_state(self, folder: Path) -> None:
        """Continue the checkpoint's run: step, epoch, optimizer, schedule, data order, random states."""
        state = self._resume.state  # read (mmap: only rank 0 reads the optimizer tensors) when it was chosen
        check_resumed_state(folder, state, self.data_fingerprint, self.dms, self.world_size, self._log)
        self.global_step, self.epoch = int(state["step"]), int(state["epoch"])
        load_optimizer_state(self.step, self.optimizer, state["optimizer"], self.distributed, self.is_rank_zero)
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.sampler.set_epoch(self.epoch)
        self.dataloader.load_state_dict(state["dataloader"])
        rng = state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0]
        restore_rng(rng, self.noise, self.device)
        self._log(
            f"resumed from {folder} at step {self.global_step} "
            f"(target CR {self.dms.target_cr(self.global_step - self.zeroing_steps):.2f})"
        )

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


# ============================================================================ entry point
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """DMS retrofit (see the module docstring). Config keys: the yaml files in dms_flex/configs/."""
    resolve_paths(cfg)
    recipe = DMSRetrofitRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()


def main() -> None:
    from omegaconf.errors import OmegaConfBaseException

    try:
        sys.argv = map_config_argument(sys.argv)
        recipe_main()
    except (RecipeError, DMSConfigError, OmegaConfBaseException) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except yaml.YAMLError as e:  # a key=value override that is not YAML (torchtune parses each value as YAML)
        where = " ".join(str(e).split())
        print(
            f"error: a key=value override is not valid YAML ({where}). Inside a list, quote each interpolation: "
            + '\'dataset=["${reasoning}","${code}","${prose}"]\'',
            file=sys.stderr,
        )
        sys.exit(2)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a finished rank of `tune run --nproc_per_node N`: every result is written and the group destroyed
        # (`cleanup`); a 2-rank gloo run once aborted in the interpreter's teardown after that, which torchrun
        # reports as a failed run (benchmarks/RESULTS.md, section 29d)
        from dms_flex import parallel

        parallel.leave(0)


if __name__ == "__main__":
    main()
