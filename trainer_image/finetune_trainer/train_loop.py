"""The per-worker training loop that Ray Train runs in every training process."""

from __future__ import annotations

import os
import random
import time
import warnings

import torch
import torch.distributed as dist

from . import checkpointing
from .checkpointing import TrainerState
from .errors import BadInputError, InjectedFault
from .progress import ProgressReporter, emit, say

# TEST HOOK, not a feature: FINETUNE_FAULT_AFTER_STEP=N makes rank 0 raise right after
# optimizer step N (after that step's checkpoint, if one was due), but only in an attempt
# that did not resume from a checkpoint, so the retry of the same job succeeds. The tests
# and the operator's retry tests use it to kill a run at a known point.
FAULT_HOOK_ENV = "FINETUNE_FAULT_AFTER_STEP"
# Rank 0 waits up to this long for Ray Train to register a SYNC checkpoint (its own upload is
# done by then; registration follows the last rank's within a second or two), and for every
# upload still running before the fault hook fires and at the end of training.
REGISTER_TIMEOUT_S = 120
FINAL_UPLOADS_TIMEOUT_S = 3600


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _all_reduce(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def train_func(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from finetune_api.model import FineTuneJob

    from .data import epoch_batches, load_shard, plan_steps, tokenize_and_pack
    from .model_io import load_tokenizer, local_model_dir, write_final_model
    from .storage import S3Settings, resolve

    # torch.distributed's deprecation notices fire on every ZeRO collective; they would
    # drown the progress lines in the driver log.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    job = FineTuneJob.from_document(config["job"])
    fresh = bool(config.get("fresh"))
    upload_mode = ray.train.CheckpointUploadMode[config.get("upload_mode", "SYNC")]
    spec, training = job.spec, job.spec.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    _seed_everything(training.seed)
    settings = S3Settings.from_spec(spec.s3)

    # --- data: this rank's documents, packed; all ranks agree on the number of batches.
    model_path = local_model_dir(spec.model.uri, spec.model.revision, settings)
    tokenizer = load_tokenizer(model_path, spec.model.revision)
    data_loc = resolve(spec.dataset.uri, settings)
    docs = load_shard(data_loc, spec.dataset.format, spec.dataset.text_field, rank, world)
    sequences = tokenize_and_pack(docs, tokenizer, spec.dataset.max_seq_length)
    mbs, gas = training.micro_batch_size, training.gradient_accumulation_steps
    n_batches = int(_all_reduce([len(sequences) // mbs], device, dist.ReduceOp.MIN)[0])
    plan = plan_steps(n_batches, gas, training.epochs, training.max_steps)
    if plan.total_steps == 0:
        raise BadInputError(
            f"the dataset {spec.dataset.uri} is too small for one optimizer step: {n_batches} micro-batches of "
            f"{mbs} x {spec.dataset.max_seq_length} tokens per worker, {gas} needed per step "
            f"with {world} workers; use more data or a smaller maxSeqLength/microBatchSize")

    # --- model, optimizer, schedule
    if spec.strategy.type == "deepspeed":
        from .strategy_deepspeed import DeepSpeedStrategy as Strategy
    else:
        from .strategy_fsdp import FSDPStrategy as Strategy
    strategy = Strategy(job, model_path, spec.model.revision, device, plan.total_steps)

    # --- automatic resume: Ray Train hands back the latest complete checkpoint of this run
    # name; --fresh deliberately ignores it.
    state = TrainerState()
    resumed_from = None
    checkpoint = None if fresh else ray.train.get_checkpoint()
    if checkpoint is not None:
        state = checkpointing.restore(strategy, checkpoint, rank)
        resumed_from = state.step
    # A name per attempt keeps a --fresh rerun from writing into an older run's directories;
    # the driver's (launcher.attempt_name): unique, and the one its lease names.
    attempt = config["attempt"]

    tokens_per_step = world * mbs * gas * spec.dataset.max_seq_length
    if rank == 0:
        emit("started", totalSteps=plan.total_steps, resumedFromStep=resumed_from or 0,
             workers=world, strategy=spec.strategy.type)
    reporter = ProgressReporter(plan.total_steps, state.step, tokens_per_step)
    # s3://: every rank uploads its own part with boto3 (checkpointing.s3_upload_fn); other
    # schemes keep Ray Train's own copy.
    upload_fn = checkpointing.s3_upload_fn(settings, rank) if spec.checkpoint.uri.startswith("s3://") else None
    announcer = checkpointing.Announcer() if rank == 0 else None
    sync_upload = upload_mode == ray.train.CheckpointUploadMode.SYNC
    fault_after = os.environ.get(FAULT_HOOK_ENV)
    fault_after = int(fault_after) if fault_after and resumed_from is None else None
    batches_per_epoch = plan.steps_per_epoch * gas

    def save_checkpoint(loss: float) -> None:
        began = time.monotonic()
        if announcer is not None and announcer.pending and not sync_upload:
            # ASYNC: at most one checkpoint upload in flight. Ray Train queues uploads behind
            # one thread per worker; without this, checkpoints due faster than they upload
            # would pile up on local disk, each announced later than the one before.
            announcer.flush(FINAL_UPLOADS_TIMEOUT_S)
        state.rng = checkpointing.capture_rng()
        state.loss = loss
        dir_name = f"checkpoint_step{state.step:08d}_{attempt}"
        checkpointing.save(strategy, state, rank, world, {"step": state.step, "loss": loss}, dir_name,
                           upload_mode, upload_fn)
        if rank == 0:
            announcer.add(state.step, dir_name, f"{job.checkpoint_run_uri}/{dir_name}")
            if sync_upload:
                # The `checkpoint` event only once the controller has registered it (every
                # rank's upload done, and the one a rerun resumes from). The other ranks go on
                # and wait for rank 0 in the next step's collectives. A rank slower than this
                # wait leaves it to the next step boundaries' polls.
                announcer.poll(wait_s=REGISTER_TIMEOUT_S)
            else:
                announcer.poll()  # ASYNC: announced at a later step boundary (poll below)
            # How long training stood still for this checkpoint (save + upload + registration
            # with SYNC; with ASYNC the local save, plus the wait for the previous upload when
            # it is still running).
            say(f"finetune-train: checkpoint at step {state.step} stalled training for "
                f"{time.monotonic() - began:.2f}s ({upload_mode.name} upload)")

    loss = state.loss if state.loss is not None else float("nan")
    while state.step < plan.total_steps:
        batches = epoch_batches(sequences, mbs, training.seed, state.epoch, batches_per_epoch)
        micro_losses: list[float] = []
        for b in range(state.batch, batches_per_epoch):
            boundary = (b + 1) % gas == 0
            input_ids = torch.tensor(batches[b], dtype=torch.long, device=device)
            micro_losses.append(strategy.forward_backward(input_ids, boundary))
            if not boundary:
                continue
            state.step += 1
            state.tokens_seen += tokens_per_step
            state.epoch, state.batch = (state.epoch, b + 1) if b + 1 < batches_per_epoch else (state.epoch + 1, 0)
            loss = _all_reduce([sum(micro_losses) / len(micro_losses)], device)[0] / world
            micro_losses = []
            if announcer is not None:
                announcer.poll()  # ASYNC checkpoints registered since the last step
            if rank == 0:
                # Checkpoint steps are always printed: a resumed run can be compared there.
                reporter.step(state.step, state.epoch if state.batch else state.epoch - 1, loss,
                              strategy.learning_rate(), force=state.step % spec.checkpoint.every_steps == 0)
            if state.step % spec.checkpoint.every_steps == 0 or state.step == plan.total_steps:
                save_checkpoint(loss)
            if fault_after is not None and state.step == fault_after and rank == 0:
                announcer.flush(FINAL_UPLOADS_TIMEOUT_S)  # "after that step's checkpoint": complete
                raise InjectedFault(f"test hook {FAULT_HOOK_ENV}={fault_after}: injected failure after step {state.step}")
            if state.step >= plan.total_steps:
                break

    if announcer is not None:
        announcer.flush(FINAL_UPLOADS_TIMEOUT_S)  # ASYNC uploads still running

    # --- the consolidated Hugging Face model, written by rank 0 (the gather is collective).
    full = strategy.full_state_dict()
    if rank == 0:
        write_final_model(strategy.hf_model, full, tokenizer, resolve(job.final_model_uri, settings))
    dist.barrier()
    ray.train.report({"step": state.step, "loss": loss, "model_uri": job.final_model_uri})
