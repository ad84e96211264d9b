"""The per-worker training loop that Ray Train runs in every training process.

`train_func(config)` is what the TorchTrainer runs; it drives a `Trainer` through its named
steps: setup (data, plan, strategy and model), restore (automatic resume), then train_step /
after_step until the plan's last step (progress, the metrics, maybe_checkpoint, the test hook),
and finish (the final model). Metrics leave the loop at one place, `log_metrics`, for rank 0's
sinks (metrics.py).
"""

from __future__ import annotations

import os
import random
import time
import warnings

import torch
import torch.distributed as dist

from . import checkpointing, strategies
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


class Trainer:
    """One training process's run of a job. Every rank runs the same steps in the same order
    (most of them hold collectives); what only rank 0 does is marked."""

    def __init__(self, config: dict):
        import ray.train
        import ray.train.torch

        from finetune_api.model import FineTuneJob

        from .storage import S3Settings

        self.job = FineTuneJob.from_document(config["job"])
        self.spec, self.training = self.job.spec, self.job.spec.training
        self.fresh = bool(config.get("fresh"))
        # A name per attempt keeps a --fresh rerun from writing into an older run's directories;
        # the driver's (launcher.attempt_name): unique, and the one its lease names.
        self.attempt = config["attempt"]
        self.upload_mode = ray.train.CheckpointUploadMode[config.get("upload_mode", "SYNC")]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.settings = S3Settings.from_spec(self.spec.s3)
        self.state = TrainerState()
        self.resumed_from: int | None = None
        self.loss = float("nan")
        self.metrics = None  # rank 0's metrics.Metrics, from start()
        self.step_seconds = 0.0
        self.eval_loss: float | None = None
        self._epoch_batches: tuple[int, list] | None = None  # (epoch, its micro-batches)

    def run(self) -> None:
        try:
            self.setup()
            self.restore()
            self.start()
            while self.state.step < self.plan.total_steps:
                self.after_step(self.train_step())
            self.finish()
        except BaseException:
            self.close_metrics(model_uri=None)
            raise

    # --- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Data (this rank's records, packed; every rank agrees on the number of batches; the
        evaluation set), the step plan, and the strategy with the prepared model, optimizer
        and schedule."""
        from .data import plan_steps
        from .model_io import load_tokenizer, local_model_dir

        spec, training = self.spec, self.training
        _seed_everything(training.seed)
        strategy = strategies.lookup(spec.strategy.type)  # an unknown type fails before any download
        self.model_path = model_path = local_model_dir(spec.model.uri, spec.model.revision, self.settings)
        self.tokenizer = load_tokenizer(model_path, spec.model.revision)
        self.mbs, self.gas = training.micro_batch_size, training.gradient_accumulation_steps
        self.load_data()
        n_batches = int(_all_reduce([len(self.sequences) // self.mbs], self.device, dist.ReduceOp.MIN)[0])
        self.plan = plan_steps(n_batches, self.gas, training.epochs, training.max_steps)
        if self.plan.total_steps == 0:
            raise BadInputError(
                f"the dataset {spec.dataset.uri} is too small for one optimizer step: {n_batches} micro-batches of "
                f"{self.mbs} x {spec.dataset.max_seq_length} tokens per worker, {self.gas} needed per step "
                f"with {self.world} workers; use more data or a smaller maxSeqLength/microBatchSize")
        self.batches_per_epoch = self.plan.steps_per_epoch * self.gas
        self.strategy = strategy(self.job, self.device)
        self.strategy.prepare(model_path, self.plan.total_steps)

    def load_data(self) -> None:
        """self.sequences (this rank's training rows) and self.eval_rows (the whole evaluation
        set's rows, the same on every rank; None without one); rank 0's `data` event."""
        from .data import Records, build_rows, load_all, split_eval
        from .records import Counts
        from .storage import resolve

        ds = self.spec.dataset
        records = Records.of(ds)
        values = load_all(resolve(ds.uri, self.settings), ds.format, records)
        eval_values = None
        if ds.eval_fraction is not None:
            held_out = split_eval(len(values), ds.eval_fraction, ds.eval_seed)
            eval_values = [v for i, v in enumerate(values) if i in held_out]
            values = [v for i, v in enumerate(values) if i not in held_out]
        elif ds.eval_uri is not None:
            eval_values = load_all(resolve(ds.eval_uri, self.settings), ds.format, records)
        counts = Counts()
        self.sequences = build_rows(records, values[self.rank::self.world], self.tokenizer, ds.max_seq_length,
                                    ds.long_records, counts)
        self.eval_rows = None
        eval_counts = Counts()
        if eval_values is not None:
            self.eval_rows = build_rows(records, eval_values, self.tokenizer, ds.max_seq_length, ds.long_records,
                                        eval_counts, keep_tail=True)
            if not self.eval_rows:
                raise BadInputError(f"the evaluation set ({ds.eval_uri or f'evalFraction {ds.eval_fraction}'}) "
                                    "holds no record with a token to learn")
        total = [int(n) for n in _all_reduce(counts.as_list(), self.device)]
        if self.rank == 0:
            emit("data", format=records.kind, records=total[0], truncated=total[1],
                 droppedTooLong=total[2], droppedNothingToLearn=total[3],
                 evalRecords=eval_counts.records if eval_values is not None else 0,
                 evalRows=len(self.eval_rows or ()), longRecords=ds.long_records)

    def restore(self) -> None:
        """Automatic resume: Ray Train hands back the latest complete checkpoint of this run
        name; --fresh deliberately ignores it."""
        import ray.train

        checkpoint = None if self.fresh else ray.train.get_checkpoint()
        if checkpoint is not None:
            self.state = checkpointing.restore(self.strategy, checkpoint, self.rank)
            self.resumed_from = self.state.step
        if self.state.loss is not None:
            self.loss = self.state.loss

    def start(self) -> None:
        """The `started` event (rank 0), the progress reporter, checkpoint uploads, the test hook."""
        import ray.train

        spec = self.spec
        self.tokens_per_step = self.world * self.mbs * self.gas * spec.dataset.max_seq_length
        if self.rank == 0:
            emit("started", totalSteps=self.plan.total_steps, resumedFromStep=self.resumed_from or 0,
                 workers=self.world, strategy=spec.strategy.type)
            self.start_metrics()
        self.reporter = ProgressReporter(self.plan.total_steps, self.state.step, self.tokens_per_step)
        # s3://: every rank uploads its own part with boto3 (checkpointing.s3_upload_fn); other
        # schemes keep Ray Train's own copy.
        self.upload_fn = (checkpointing.s3_upload_fn(self.settings, self.rank)
                          if spec.checkpoint.uri.startswith("s3://") else None)
        self.announcer = checkpointing.Announcer() if self.rank == 0 else None
        self.sync_upload = self.upload_mode == ray.train.CheckpointUploadMode.SYNC
        fault_after = os.environ.get(FAULT_HOOK_ENV)
        self.fault_after = int(fault_after) if fault_after and self.resumed_from is None else None

    def start_metrics(self) -> None:
        """Rank 0: the metrics sinks of this attempt, continuing the restored lineage's MLflow
        run, and the `tracking` event naming where the metrics are."""
        from .metrics import Metrics
        from .storage import resolve

        self.metrics = Metrics(self.job, resolve(self.job.checkpoint_run_uri, self.settings), self.attempt,
                               self.state.step, self.plan.total_steps, self.state.tracking)
        emit("tracking", **self.metrics.describe())

    def log_metrics(self, values: dict) -> None:
        """The one place metrics leave the loop (snake_case keys, plain numbers; an eval loss
        as `eval_loss`): rank 0 hands them to every sink at the current step."""
        if self.metrics is not None:
            self.metrics.log(self.state.step, values)

    def close_metrics(self, model_uri: str | None) -> None:
        """Rank 0: the attempt's metrics saved and its MLflow run ended (FINISHED with the final
        model's URI, FAILED without)."""
        metrics, self.metrics = self.metrics, None
        if metrics is None:
            return
        if model_uri is not None:
            metrics.close(model_uri)
            return
        try:  # on the way out of a failed attempt: keep what it logged, without masking the error
            metrics.close(None)
        except Exception as exc:
            say(f"finetune-train: warning: the failed attempt's metrics were not all saved: {exc}")

    # --- the loop --------------------------------------------------------------------------

    def _batches_of(self, epoch: int) -> list:
        from .data import epoch_batches

        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            self._epoch_batches = (epoch, epoch_batches(self.sequences, self.mbs, self.training.seed, epoch,
                                                        self.batches_per_epoch))
        return self._epoch_batches[1]

    def train_step(self) -> float:
        """One optimizer step: the next `gradientAccumulationSteps` micro-batches from the data
        position in the state, which it advances. Returns the loss averaged over every rank."""
        state = self.state
        began = time.monotonic()
        # Steps never straddle epochs: an epoch is a whole number of steps' micro-batches.
        batches = self._batches_of(state.epoch)
        from .data import model_inputs

        micro_losses: list[float] = []
        for i in range(self.gas):
            batch = model_inputs(batches[state.batch + i], self.device)
            micro_losses.append(self.strategy.forward_backward(batch, boundary=i == self.gas - 1))
        state.step += 1
        state.tokens_seen += self.tokens_per_step
        state.batch += self.gas
        if state.batch == self.batches_per_epoch:
            state.epoch, state.batch = state.epoch + 1, 0
        loss = _all_reduce([sum(micro_losses) / len(micro_losses)], self.device)[0] / self.world
        self.step_seconds = time.monotonic() - began
        return loss

    def after_step(self, loss: float) -> None:
        state = self.state
        self.loss = loss
        if self.announcer is not None:
            self.announcer.poll()  # ASYNC checkpoints registered since the last step
        if self.rank == 0:
            lr = self.strategy.learning_rate()
            # Checkpoint steps are always printed: a resumed run can be compared there.
            self.reporter.step(state.step, state.epoch if state.batch else state.epoch - 1, loss,
                               lr, force=state.step % self.spec.checkpoint.every_steps == 0)
            self.log_metrics({"loss": loss, "learning_rate": lr, "grad_norm": self.strategy.grad_norm(),
                              "tokens_per_second": self.tokens_per_step / max(self.step_seconds, 1e-9)})
        self.maybe_evaluate()
        self.maybe_checkpoint()
        self.maybe_inject_fault()

    def maybe_evaluate(self) -> None:
        every = self.training.eval_every_steps
        if self.eval_rows is not None and (self.state.step == self.plan.total_steps
                                           or (every and self.state.step % every == 0)):
            self.evaluate()

    def evaluate(self) -> float:
        """Collective: the evaluation loss over the whole evaluation set (evaluation.py), the
        `eval` event (rank 0)."""
        from .data import model_inputs
        from .evaluation import rank_batches

        began = time.monotonic()
        loss_sum, tokens = 0.0, 0
        for rows in rank_batches(self.eval_rows, self.rank, self.world, self.mbs):
            s, n = self.strategy.eval_sums(model_inputs(rows, self.device))
            loss_sum, tokens = loss_sum + s, tokens + n
        total_sum, total_tokens = _all_reduce([loss_sum, float(tokens)], self.device)
        self.eval_loss = total_sum / total_tokens
        if self.rank == 0:
            emit("eval", step=self.state.step, evalLoss=round(self.eval_loss, 6), evalTokens=int(total_tokens),
                 seconds=round(time.monotonic() - began, 2))
        self.log_metrics({"eval_loss": self.eval_loss})
        return self.eval_loss

    def reported(self) -> dict:
        """What the loop reports to Ray Train (checkpoints and the end)."""
        out = {"step": self.state.step, "loss": self.loss}
        if self.eval_loss is not None:
            out["eval_loss"] = self.eval_loss
        return out

    def maybe_checkpoint(self) -> None:
        if self.state.step % self.spec.checkpoint.every_steps == 0 or self.state.step == self.plan.total_steps:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """Collective: every rank saves and reports its part; rank 0 announces it."""
        state, announcer = self.state, self.announcer
        began = time.monotonic()
        if announcer is not None and announcer.pending and not self.sync_upload:
            # ASYNC: at most one checkpoint upload in flight. Ray Train queues uploads behind
            # one thread per worker; without this, checkpoints due faster than they upload
            # would pile up on local disk, each announced later than the one before.
            announcer.flush(FINAL_UPLOADS_TIMEOUT_S)
        state.rng = checkpointing.capture_rng()
        state.loss = self.loss
        if self.metrics is not None:
            state.tracking = self.metrics.state()
        dir_name = f"checkpoint_step{state.step:08d}_{self.attempt}"
        checkpointing.save(self.strategy, state, self.rank, self.world, self.reported(),
                           dir_name, self.upload_mode, self.upload_fn)
        if self.metrics is not None:
            self.metrics.checkpoint(state.step)  # marks the curve, and saves the metrics so far
        if announcer is not None:
            announcer.add(state.step, dir_name, f"{self.job.checkpoint_run_uri}/{dir_name}")
            if self.sync_upload:
                # The `checkpoint` event only once the controller has registered it (every
                # rank's upload done, and the one a rerun resumes from). The other ranks go on
                # and wait for rank 0 in the next step's collectives. A rank slower than this
                # wait leaves it to the next step boundaries' polls.
                announcer.poll(wait_s=REGISTER_TIMEOUT_S)
            else:
                announcer.poll()  # ASYNC: announced at a later step boundary (after_step)
            # How long training stood still for this checkpoint (save + upload + registration
            # with SYNC; with ASYNC the local save, plus the wait for the previous upload when
            # it is still running).
            say(f"finetune-train: checkpoint at step {state.step} stalled training for "
                f"{time.monotonic() - began:.2f}s ({self.upload_mode.name} upload)")

    def maybe_inject_fault(self) -> None:
        if self.fault_after is not None and self.state.step == self.fault_after and self.rank == 0:
            self.announcer.flush(FINAL_UPLOADS_TIMEOUT_S)  # "after that step's checkpoint": complete
            raise InjectedFault(f"test hook {FAULT_HOOK_ENV}={self.fault_after}: "
                                f"injected failure after step {self.state.step}")

    # --- the end ---------------------------------------------------------------------------

    def finish(self) -> None:
        """Collective: the consolidated Hugging Face model (or the adapter, and the merged model
        when asked), written by rank 0, and the last report."""
        import ray.train

        from .adapters import write_adapter_outputs
        from .final_model import write_final_model
        from .storage import resolve

        if self.announcer is not None:
            self.announcer.flush(FINAL_UPLOADS_TIMEOUT_S)  # ASYNC uploads still running
        # The gathers are collective: every rank runs them, rank 0 writes.
        if self.spec.adapter is not None:
            adapter = dict(self.strategy.full_tensors(trainable_only=True))  # the adapter alone: small
            if self.rank == 0:
                write_adapter_outputs(self.job, self.strategy.hf_model, adapter, self.tokenizer, self.model_path,
                                      self.settings)
        else:
            write_final_model(self.strategy, self.tokenizer, self.model_path, self.spec.model.revision,
                              resolve(self.job.final_model_uri, self.settings), self.rank)
        if self.rank == 0:
            outputs = self.job.outputs
            self.close_metrics(model_uri=outputs.get("modelUri") or outputs.get("adapterUri"))
        dist.barrier()
        ray.train.report({**self.reported(), "outputs": self.job.outputs})


def train_func(config: dict) -> None:
    # torch.distributed's deprecation notices fire on every ZeRO collective; they would
    # drown the progress lines in the driver log.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    Trainer(config).run()
