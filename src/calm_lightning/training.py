"""`calm train`: build the DataModule, the LightningModule for ``model.kind`` and the Trainer, then fit.

Runs live in ``runs/<name>/version_<n>`` (TensorBoard logs, ``config.yaml``, ``checkpoints/``); with
``logging.resume=true`` the latest version continues from its ``last.ckpt``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from calm_lightning.artifacts import export_autoencoder, load_autoencoder
from calm_lightning.callbacks.budget import StepProgressBar, TimeGuard, budget_status
from calm_lightning.callbacks.hparams import HParamsSummary
from calm_lightning.callbacks.reconstruction import ReconstructionExamples, RobustnessCurve
from calm_lightning.callbacks.throughput import TokensPerSecond
from calm_lightning.config.schema import ExperimentConfig
from calm_lightning.data.datamodule import TokenChunkDataModule
from calm_lightning.errors import CalmError
from calm_lightning.flops import training_flops_per_token
from calm_lightning.lit.autoencoder_module import AutoencoderLitModule
from calm_lightning.lit.checkpoint_io import AtomicCheckpointIO
from calm_lightning.lit.lm_modules import CALMLitModule, TokenLMLitModule
from calm_lightning.lit.sharding import full_model_on_rank_zero
from calm_lightning.runs import check_resumable, is_rank_zero, shared_run
from calm_lightning.utils.hardware import resolve_precision
from calm_lightning.utils.io import atomic_write_text


def build_module(exp: ExperimentConfig, config: dict[str, Any], dm: TokenChunkDataModule) -> L.LightningModule:
    fingerprint = dm.tokenizer_fingerprint
    kind = exp.model.kind
    if kind == "autoencoder":
        return AutoencoderLitModule(config, vocab_size=dm.vocab_size, mask_token_id=dm.special_ids.mask,
                                    tokenizer_fingerprint=fingerprint)
    if kind == "ar":
        return TokenLMLitModule(config, vocab_size=dm.vocab_size, tokenizer_fingerprint=fingerprint)
    ae_cfg = exp.model.autoencoder
    autoencoder, _ = load_autoencoder(exp.model.autoencoder_path, expect_chunk_size=ae_cfg.chunk_size,
                                      expect_latent_size=ae_cfg.latent_size, expect_tokenizer=fingerprint)
    module = CALMLitModule(config, autoencoder_config=dataclasses.asdict(autoencoder.cfg),
                           tokenizer_fingerprint=fingerprint)
    module.load_autoencoder_weights(autoencoder)
    return module


def init_weights_from(model: torch.nn.Module, source: str, kind: str) -> None:
    """Copy every parameter and buffer of ``model`` from ``source`` (``model.init_from``): a run or
    .ckpt of the same model kind, or an autoencoder export for an autoencoder. Shapes must match; the
    first mismatch is one line naming the parameter."""
    from calm_lightning.checkpoints import read_checkpoint

    where = f"model.init_from={source}"
    path = Path(source)
    if path.suffix == ".pt" and path.is_file():
        if kind != "autoencoder":
            raise CalmError(f"{where}: an autoencoder export initialises an autoencoder run, not a {kind} run")
        state = load_autoencoder(path)[0].state_dict()
    else:
        ckpt = read_checkpoint(path)
        if ckpt.kind != kind:
            raise CalmError(f"{where}: that is a {ckpt.kind} checkpoint, this run trains a {kind} model")
        state = {k[len("model."):]: v for k, v in ckpt.blob["state_dict"].items() if k.startswith("model.")}
    target = model.state_dict()
    for name, value in target.items():
        if name not in state:
            raise CalmError(f"{where}: parameter {name} is missing there")
        if tuple(state[name].shape) != tuple(value.shape):
            raise CalmError(
                f"{where}: parameter {name} has shape {tuple(state[name].shape)} there but {tuple(value.shape)} here"
            )
    extra = sorted(set(state) - set(target))
    if extra:
        raise CalmError(f"{where}: parameter {extra[0]} there has no counterpart here")
    model.load_state_dict(state)


def world_size(exp: ExperimentConfig) -> int:
    """Processes the Trainer will run: devices per node x nodes ("auto": every visible GPU, else 1)."""
    t = exp.trainer
    if t.devices != "auto":
        per_node = int(t.devices)
    elif t.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        per_node = torch.cuda.device_count()
    else:
        per_node = 1
    return per_node * t.num_nodes


def accumulation(exp: ExperimentConfig) -> int:
    """Micro-batches per optimizer step: ``optim.tokens_per_step`` spread over the world, if set."""
    o, d = exp.optim, exp.data
    if o.tokens_per_step <= 0:
        return o.accumulate_grad_batches
    processes = world_size(exp)
    per_micro_step = d.batch_size * d.block_size * processes
    if o.tokens_per_step % per_micro_step:
        raise CalmError(
            f"optim.tokens_per_step={o.tokens_per_step} is not a multiple of data.batch_size x data.block_size x "
            f"processes = {d.batch_size} x {d.block_size} x {processes} = {per_micro_step}"
        )
    return o.tokens_per_step // per_micro_step


def build_strategy(exp: ExperimentConfig, module: L.LightningModule):
    """``trainer.strategy`` as Lightning takes it; "fsdp" shards each backbone block in its own unit and
    leaves CALM's frozen autoencoder out of FSDP (replicated, never sharded: it has no gradients or
    optimizer state to shard, and CALM calls its ``encode``/``decode`` rather than ``forward``)."""
    if exp.trainer.strategy != "fsdp":
        return exp.trainer.strategy
    from lightning.pytorch.strategies import FSDPStrategy

    from calm_lightning.models.backbone import Block

    frozen = getattr(module.model, "autoencoder", None)
    # use_orig_params: the optimiser's weight-decay groups name the original parameters (lit/optim.py)
    return FSDPStrategy(
        auto_wrap_policy={Block},
        ignored_modules=[frozen] if frozen is not None else None,
        use_orig_params=True,
    )


def _trainer(
    exp: ExperimentConfig, module: L.LightningModule, logger: TensorBoardLogger, callbacks: list[L.Callback],
    quiet: bool,
) -> L.Trainer:
    t = exp.trainer
    devices: int | str = "auto" if t.devices == "auto" else int(t.devices)
    try:
        return _make_trainer(exp, build_strategy(exp, module), logger, callbacks, quiet, devices)
    except (MisconfigurationException, ValueError) as e:  # e.g. more devices than available, unknown strategy
        raise CalmError(f"trainer: {str(e).splitlines()[0]}") from None


def _make_trainer(exp: ExperimentConfig, strategy, logger, callbacks, quiet: bool, devices: int | str) -> L.Trainer:
    t = exp.trainer
    accumulate = accumulation(exp)
    return L.Trainer(
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=resolve_precision(t.precision, t.accelerator),
        max_steps=t.max_steps,
        # the schema counts optimizer steps; Lightning counts batches
        val_check_interval=t.val_check_interval * accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if t.limit_val_batches > 0 else None,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=exp.optim.grad_clip if exp.optim.grad_clip > 0 else None,
        accumulate_grad_batches=accumulate,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        enable_progress_bar=not quiet,
        benchmark=False,
    )


def train(cfg: DictConfig, *, quiet: bool = False, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Fit the configured model; returns the final metrics and paths (also printed as a table).

    ``callbacks`` are added to the kit's own (checkpointing, throughput, samples, ...)."""
    exp: ExperimentConfig = OmegaConf.to_object(cfg)
    # CALM's autoencoder is frozen in eval mode on purpose; Lightning warns about it at every fit
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    config = OmegaConf.to_container(cfg, resolve=True)
    if exp.trainer.threads > 0:
        torch.set_num_threads(exp.trainer.threads)
    L.seed_everything(exp.trainer.seed, workers=True, verbose=False)
    kind = exp.model.kind
    dm = TokenChunkDataModule.from_config(exp, exp.model.autoencoder.chunk_size)
    module = build_module(exp, config, dm)
    if exp.model.init_from:
        init_weights_from(module.model, exp.model.init_from, kind)
    if exp.trainer.compile:
        module.compile_training()  # the training loss only: checkpoints and eval paths stay eager

    version, ckpt = shared_run(exp.logging.runs_dir, exp.logging.name, exp.logging.resume)
    if ckpt is not None:
        check_resumable(ckpt, config["model"], kind)
    logger = TensorBoardLogger(exp.logging.runs_dir, name=exp.logging.name, version=version, default_hp_metric=False)
    run_dir = Path(logger.log_dir)
    if is_rank_zero():
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))

    throughput = TokensPerSecond(
        flops_per_token=training_flops_per_token(module.model, seq_len=exp.data.block_size),
        peak_flops=exp.trainer.peak_flops,
    )
    callbacks = [
        *(callbacks or []),
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=exp.trainer.checkpoint_every_n_steps, save_last=True, save_top_k=1),
        LearningRateMonitor(logging_interval="step"),
        throughput,
        HParamsSummary(config),  # TensorBoard's HParams tab compares runs by their config
        guard := TimeGuard(exp.trainer.max_time_minutes),  # a safety net; budgets are in steps
    ]
    if not quiet:
        callbacks.append(StepProgressBar(leave=True))
    if kind == "autoencoder":
        callbacks += [ReconstructionExamples(dm.tokenizer), RobustnessCurve()]
    else:
        from calm_lightning.callbacks.samples import TemperatureSamples

        callbacks.append(TemperatureSamples(dm.tokenizer, exp.sampling, seed=exp.trainer.seed,
                                            eos_id=dm.special_ids.eos, console=not quiet))

    trainer = _trainer(exp, module, logger, callbacks, quiet)
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)  # before any sharding
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    if trainer.global_step > 0 and trainer.state.status.value == "finished":
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
        has_val = any(k.startswith("val/") for k in trainer.callback_metrics)
        if not has_val or trainer.global_step % exp.trainer.val_check_interval:
            # stopped between validations (time guard), or resumed a finished run: the summary and the
            # export need metrics of the final weights
            trainer.validate(module, datamodule=dm, verbose=False)
    elapsed = time.perf_counter() - start

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    result: dict[str, Any] = {
        "kind": kind,
        "run_dir": str(run_dir),
        "global_step": trainer.global_step,
        "budget": budget_status(trainer.global_step, exp.trainer.max_steps, guard.state_dict()),
        "wall_time_s": elapsed,
        "train_tokens_per_s": throughput.mean_tokens_per_s,
        "mfu": throughput.mean_mfu,
        "parameters": trainable,
        "metrics": metrics,
    }
    if kind == "autoencoder" and exp.logging.export_path:
        with full_model_on_rank_zero(trainer, module) as model:  # every rank: the weights may be sharded
            if model is not None:
                export_autoencoder(model, exp.logging.export_path, tokenizer_fingerprint=dm.tokenizer_fingerprint,
                                   tokenizer_path=str(dm.tokenizer_path), metrics=metrics)
                result["export"] = exp.logging.export_path
    return result
