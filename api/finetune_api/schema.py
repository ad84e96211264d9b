"""The FineTuneJob schema: the one source of truth for the spec.

`crds/finetune.dev_finetunejobs.yaml` is generated from this module (`make crds`), the
Python validator in `validation.py` evaluates exactly this schema and its CEL rules, and
the spec reference in `docs/` is generated from the descriptions here. A test proves the
checked-in CRD equals what this module produces.
"""

from __future__ import annotations

from typing import Any

from .status import ConditionType, MlflowSecret, Phase, S3Secret

Schema = dict[str, Any]

URI_SCHEMES_MODEL = ("hf", "s3", "file")
URI_SCHEMES_DATA = ("s3", "file")
URI_SCHEMES_CHECKPOINT = ("s3", "file")
PHASES = Phase.words()
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
# A Kubernetes resource quantity, as the API server's own regex for `quantity` has it.
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
# A DNS-1035 label (a letter first): KubeRay >= 1.5 refuses RayCluster names that are not
# (its ValidateRayClusterMetadata; the cluster is then never reconciled, only an Event says so).
DNS_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# The job's name is its RayCluster's, and KubeRay derives Service and pod names (DNS labels of
# at most 63 characters) from it; the API server adds 5 characters to a generateName.
MAX_NAME_LENGTH = 45
MAX_GENERATE_NAME_LENGTH = MAX_NAME_LENGTH - 5


def _uri_pattern(schemes: tuple[str, ...]) -> str:
    return "^(" + "|".join(schemes) + ")://.+"


def string(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


def integer(description: str, **extra: Any) -> Schema:
    return {"type": "integer", "description": description, **extra}


def number(description: str, **extra: Any) -> Schema:
    return {"type": "number", "description": description, **extra}


def boolean(description: str, **extra: Any) -> Schema:
    return {"type": "boolean", "description": description, **extra}


def obj(description: str, properties: dict[str, Schema], *, required: tuple[str, ...] = (),
        rules: tuple[dict[str, str], ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "description": description, "properties": properties}
    if required:
        schema["required"] = list(required)
    if rules:
        schema["x-kubernetes-validations"] = list(rules)
    schema.update(extra)
    return schema


def rule(expression: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """A CEL rule as the API server evaluates it; `fieldPath` makes errors name the field."""
    out = {"rule": expression, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def uri(description: str, schemes: tuple[str, ...]) -> Schema:
    return string(description, pattern=_uri_pattern(schemes), maxLength=2048)


MODEL = obj(
    "The base model to fine-tune: weights, config and tokenizer in Hugging Face layout.",
    {
        "uri": uri("Where the model is: hf://ORG/NAME (Hugging Face Hub), s3://BUCKET/PREFIX "
                   "(a saved model, downloaded in parallel) or file://PATH (a volume path).",
                   URI_SCHEMES_MODEL),
        "revision": string("Hub revision (branch, tag or commit) for hf:// models.", maxLength=256),
    },
    required=("uri",),
)

RECORD_FORMATS = ("chat", "prompt-completion")

DATASET = obj(
    "Training data. Text is tokenized, packed into maxSeqLength sequences and sharded across "
    "workers, with the loss on every token; chat and prompt-completion records are rendered "
    "one by one, the loss only on the assistant turns or the completion, and packed whole "
    "(docs/data.md says exactly what packing guarantees).",
    {
        "uri": uri("A file or a prefix of files: s3://BUCKET/KEY or file://PATH.", URI_SCHEMES_DATA),
        "format": string("What a record is. auto, jsonl, parquet, text: raw text, the file "
                         "format picked from the extension (.jsonl/.json, .parquet, .txt) or "
                         "named. chat: records whose messagesField is a list of {role, "
                         "content}, rendered with the tokenizer's chat template; "
                         "prompt-completion: records with promptField and completionField. "
                         "Both read .jsonl/.json or .parquet files.",
                         enum=["auto", "jsonl", "parquet", "text", *RECORD_FORMATS],
                         default="auto"),
        "textField": string("The field (jsonl) or column (parquet) holding the text.",
                            default="text", minLength=1),
        "messagesField": string("format chat: the field holding the list of messages.",
                                default="messages", minLength=1),
        "promptField": string("format prompt-completion: the field holding the prompt (no "
                              "loss on it).", default="prompt", minLength=1),
        "completionField": string("format prompt-completion: the field holding the "
                                  "completion (the loss is on it and the EOS after it).",
                                  default="completion", minLength=1),
        "maxSeqLength": integer("Length in tokens of each packed training sequence.",
                                minimum=8, maximum=1048576, default=2048),
        "longRecords": string("chat and prompt-completion: what happens to a record longer "
                              "than maxSeqLength. truncate keeps its first maxSeqLength "
                              "tokens (a record left with no token to learn is dropped), drop "
                              "leaves it out; the trainer's data event counts both.",
                              enum=["truncate", "drop"], default="truncate"),
        "evalUri": uri("A held-out evaluation set in the same format: s3://BUCKET/KEY or "
                       "file://PATH. Not with evalFraction.", URI_SCHEMES_DATA),
        "evalFraction": number("Hold out this fraction of the records (at least one) as the "
                               "evaluation set, chosen with evalSeed. Not with evalUri.",
                               exclusiveMinimum=True, minimum=0, maximum=0.5),
        "evalSeed": integer("Seed of the evalFraction split: fixed, so runs with different "
                            "training seeds are evaluated on the same records.", minimum=0,
                            default=0),
    },
    required=("uri",),
    rules=(
        rule("!has(self.evalUri) || !has(self.evalFraction)",
             "evalUri and evalFraction are exclusive: give the evaluation set as files or as "
             "a fraction of the training records, not both", ".evalFraction"),
    ),
)

DEEPSPEED = obj(
    "DeepSpeed ZeRO settings (only with strategy.type: deepspeed).",
    {
        "stage": integer("ZeRO stage: 1 shards optimizer state, 2 also gradients, "
                         "3 also parameters.", enum=[1, 2, 3], default=3),
        "offloadOptimizer": string("Keep optimizer state on the CPU instead of the GPU.",
                                   enum=["none", "cpu"], default="none"),
        "offloadParam": string("Keep parameters on the CPU between uses (ZeRO-3 only).",
                               enum=["none", "cpu"], default="none"),
        "config": {
            "type": "object",
            "description": "Raw DeepSpeed config merged last, over what the trainer derives; "
                           "for power users.",
            "x-kubernetes-preserve-unknown-fields": True,
        },
    },
    rules=(
        rule("self.offloadParam == 'none' || self.stage == 3",
             "offloadParam needs ZeRO stage 3", ".offloadParam"),
    ),
)

FSDP = obj(
    "PyTorch FSDP settings (only with strategy.type: fsdp).",
    {
        "shardingStrategy": string(
            "FULL_SHARD shards parameters, gradients and optimizer state; SHARD_GRAD_OP keeps "
            "parameters whole between forward and backward; NO_SHARD is plain data parallel; "
            "HYBRID_SHARD shards inside a worker and replicates across workers.",
            enum=list(SHARDING_STRATEGIES), default="FULL_SHARD"),
        "cpuOffload": boolean("Keep parameters and gradients on the CPU between uses.",
                              default=False),
    },
)

STRATEGY = obj(
    "How the model is distributed across the workers.",
    {
        "type": string("deepspeed (ZeRO) or fsdp (PyTorch Fully Sharded Data Parallel).",
                       enum=["deepspeed", "fsdp"], default="deepspeed"),
        "deepspeed": DEEPSPEED,
        "fsdp": FSDP,
    },
    rules=(
        rule("!has(self.fsdp) || self.type == 'fsdp'",
             "fsdp settings are only allowed with strategy.type: fsdp", ".fsdp"),
        rule("!has(self.deepspeed) || self.type == 'deepspeed'",
             "deepspeed settings are only allowed with strategy.type: deepspeed", ".deepspeed"),
    ),
    default={},
)

ADAPTER_TYPES = ("lora", "qlora")
# PEFT's name for "every linear layer but the output head": for Llama-style models (Llama,
# Mistral, Qwen2, the tiny model) the attention and MLP projections q/k/v/o_proj and
# gate/up/down_proj, and the same idea for any other architecture PEFT can load.
DEFAULT_TARGET_MODULES = "all-linear"

ADAPTER = obj(
    "Train a low-rank adapter (LoRA, through PEFT) instead of every weight: the base model "
    "stays frozen, only the adapter's parameters train and have optimizer state, and the "
    "checkpoints hold only the adapter and its optimizer state. The adapter goes to "
    "<checkpoint uri>/<job name>/adapter in PEFT's layout (status.output.adapterUri); with "
    "merge, the merged full model to .../final (status.output.modelUri). Absent: full "
    "fine-tuning.",
    {
        "type": string("lora (frozen base in the master-weight dtype) or qlora (frozen base "
                       "quantized to 4-bit NF4 with bitsandbytes; needs GPUs and ZeRO stage 1 "
                       "or 2).", enum=list(ADAPTER_TYPES)),
        "rank": integer("The rank r of each low-rank update B·A.", minimum=1, maximum=1024,
                        default=8),
        "alpha": integer("LoRA alpha: the update is scaled by alpha / rank.", minimum=1,
                         maximum=65536, default=16),
        "dropout": number("Dropout on the adapter's input during training.", minimum=0,
                          maximum=0.9, default=0.0),
        "targetModules": {
            "type": "array",
            "description": "Names (or name suffixes) of the modules that get an adapter, e.g. "
                           "[q_proj, v_proj]. Empty: every linear layer except the output "
                           "head (PEFT's all-linear; the attention and MLP projections of a "
                           "Llama-style model).",
            "maxItems": 64,
            "items": {"type": "string", "minLength": 1, "maxLength": 256},
        },
        "merge": boolean("Also write the base model with the adapter merged into its weights "
                         "(a full model in the base model's dtype, loadable without PEFT).",
                         default=False),
    },
    required=("type",),
)

TRAINING = obj(
    "The optimisation loop.",
    {
        "epochs": integer("Passes over the dataset (ignored once maxSteps is reached).",
                          minimum=1, default=1),
        "maxSteps": integer("Stop after this many optimizer steps.", minimum=1),
        "microBatchSize": integer("Sequences per worker per forward pass.", minimum=1, default=1),
        "gradientAccumulationSteps": integer("Micro-batches per optimizer step.",
                                             minimum=1, default=1),
        "learningRate": number("Peak learning rate.", exclusiveMinimum=True, minimum=0,
                               maximum=1, default=2.0e-5),
        "weightDecay": number("AdamW weight decay.", minimum=0, default=0.0),
        "warmupSteps": integer("Steps of linear warm-up from zero to learningRate.",
                               minimum=0, default=0),
        "lrScheduler": string("Learning-rate schedule after warm-up.",
                              enum=["constant", "linear", "cosine"], default="cosine"),
        "precision": string("Numeric precision of the training math. fp16 needs a GPU.",
                            enum=["fp32", "bf16", "fp16"], default="bf16"),
        "activationCheckpointing": boolean("Recompute activations in backward to save memory.",
                                           default=False),
        "maxGradNorm": number("Clip the global gradient norm to this value; 0 turns "
                              "clipping off.", minimum=0, default=1.0),
        "seed": integer("Seed for initialisation, data order and dropout.", minimum=0,
                        default=42),
        "evalEverySteps": integer("Compute the evaluation loss every this many optimizer "
                                  "steps (it is always computed at the end when the dataset "
                                  "has an evaluation set).", minimum=1),
    },
    rules=(
        rule("!has(self.maxSteps) || self.warmupSteps < self.maxSteps",
             "warmupSteps must be smaller than maxSteps", ".warmupSteps"),
    ),
    default={},
)

TOLERATION = obj(
    "A Kubernetes toleration, copied to the worker pods.",
    {
        "key": string("Taint key.", maxLength=317),
        "operator": string("Exists or Equal.", enum=["Exists", "Equal"]),
        "value": string("Taint value (with Equal).", maxLength=63),
        "effect": string("NoSchedule, PreferNoSchedule or NoExecute.",
                         enum=["NoSchedule", "PreferNoSchedule", "NoExecute"]),
        "tolerationSeconds": integer("How long a NoExecute taint is tolerated."),
    },
    rules=(
        rule("!has(self.operator) || self.operator != 'Exists' || !has(self.value) "
             "|| self.value == ''",
             "a toleration with operator Exists must not have a value", ".value"),
    ),
)

RESOURCES = obj(
    "The workers and the GPU node pool they run on.",
    {
        "workers": integer("Worker pods (Ray workers). Training runs one process per GPU, "
                           "or one per worker on CPU.", minimum=1, maximum=4096, default=1),
        "gpusPerWorker": integer("nvidia.com/gpu per worker pod; 0 trains on CPU.",
                                 minimum=0, maximum=16, default=1),
        "cpusPerWorker": integer("CPU cores per worker pod.", minimum=1, default=8),
        "memoryPerWorker": string("Memory per worker pod, as a Kubernetes quantity.",
                                  pattern=QUANTITY_PATTERN, maxLength=64, default="32Gi"),
        "image": string("Trainer image; empty takes the operator's default."),
        "nodeSelector": {
            "type": "object",
            "description": "Node labels that pick the GPU node pool.",
            "additionalProperties": {"type": "string"},
        },
        "tolerations": {
            "type": "array",
            "description": "Tolerations for the node pool's taints.",
            "maxItems": 64,
            "items": TOLERATION,
        },
        "priorityClassName": string("PriorityClass of the worker pods."),
    },
    rules=(
        # The pattern admits any quantity; a size must be more than zero (its mantissa, the
        # digits before any suffix or exponent, has a non-zero digit and no sign). has(): the
        # API server checks the section's default ({}) against its rules too.
        rule("!has(self.memoryPerWorker) || self.memoryPerWorker.matches('^[+]?[0-9.]*[1-9]')",
             "memoryPerWorker must be more than zero", ".memoryPerWorker"),
    ),
    default={},
)

CHECKPOINT = obj(
    "Where checkpoints and the final model go: <uri>/<job name>/checkpoint_*, "
    "<uri>/<job name>/final.",
    {
        "uri": uri("s3://BUCKET/PREFIX or file://PATH.", URI_SCHEMES_CHECKPOINT),
        "everySteps": integer("Save a checkpoint every this many optimizer steps (and at "
                              "the end).", minimum=1, default=500),
        "keep": integer("How many of the latest checkpoints to keep.", minimum=1, default=3),
    },
    required=("uri",),
)

S3 = obj(
    "S3 access for s3:// URIs.",
    {
        "secretRef": string("Name of a Secret in the job's namespace with the keys "
                            f"{' and '.join(S3Secret.REQUIRED)} (and optionally "
                            f"{', '.join(S3Secret.OPTIONAL)}). Empty uses the pods' own "
                            "identity.",
                            pattern=r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", maxLength=253),
        "endpoint": string("S3 endpoint URL for S3-compatible stores (MinIO, Ceph); empty "
                           "for AWS.", pattern=r"^$|^https?://[^\s/]+(/.*)?$"),
        "region": string("Bucket region.", default="us-east-1", minLength=1),
        "maxAttempts": integer("Attempts per S3 request (uploads, downloads, listings) before "
                               "the run fails: the SDKs' standard retry mode, exponential "
                               "back-off with jitter doubling up to 20 s between attempts (from "
                               "50 ms for boto3, 1 s for pyarrow). The default rides out at "
                               "least 30 s of connection resets or throttling, a minute on "
                               "average.", minimum=1, maximum=30, default=15),
    },
    default={},
)

# --- tracking (metrics beyond the TensorBoard files every run writes) ---------------------

MLFLOW = obj(
    "An MLflow tracking server. The job's run there holds the spec as params, the training "
    "metrics per step (train/loss, eval/loss, train/learning_rate, train/tokens_per_second, "
    "train/grad_norm) and the final model's URI as the tag finetune.modelUri; resumed "
    "attempts log to the same run, a --fresh run starts a new one.",
    {
        # No user:password@ in the URI: credentials go in the Secret (secretRef) only.
        "uri": string("The tracking server: http(s)://HOST[:PORT][/PATH], without credentials "
                      "(those go in secretRef's Secret).",
                      pattern=r"^https?://[^\s/@]+(/\S*)?$", maxLength=2048),
        "experiment": string("The experiment the run goes in; created when it does not exist.",
                             minLength=1, maxLength=500),
        "secretRef": string("Name of a Secret in the job's namespace with "
                            f"{' and '.join(MlflowSecret.OPTIONAL[:2])}, or "
                            f"{MlflowSecret.OPTIONAL[2]}, for a server that asks for them; "
                            "empty for one that does not.",
                            pattern=r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", maxLength=253),
    },
    required=("uri", "experiment"),
)

TRACKING = obj(
    "Where the training metrics go besides the TensorBoard event files and the metrics log "
    "every run writes next to its checkpoints (<checkpoint.uri>/<job name>/tensorboard and "
    "/metrics).",
    {"mlflow": MLFLOW},
    default={},
)

RUN_POLICY = obj(
    "Retries, deadlines, suspension and clean-up.",
    {
        "suspend": boolean("Stop the run and delete its cluster; false again resumes from "
                           "the latest checkpoint.", default=False),
        "backoffLimit": integer("How many times a failed run is retried (resuming from its "
                                "latest checkpoint).", minimum=0, maximum=100, default=3),
        "activeDeadlineSeconds": integer("Fail the job after this many seconds of running.",
                                         minimum=1),
        "ttlSecondsAfterFinished": integer("Delete the FineTuneJob this long after it "
                                           "finished.", minimum=0),
        "cleanupPolicy": string("What happens to the RayCluster when the job finishes.",
                                enum=["DeleteCluster", "KeepOnFailure", "Keep"],
                                default="DeleteCluster"),
    },
    default={},
)

SPEC = obj(
    "What to fine-tune, on what, and how.",
    {
        "model": MODEL,
        "dataset": DATASET,
        "strategy": STRATEGY,
        "training": TRAINING,
        "adapter": ADAPTER,
        "resources": RESOURCES,
        "checkpoint": CHECKPOINT,
        "s3": S3,
        "tracking": TRACKING,
        "runPolicy": RUN_POLICY,
    },
    required=("model", "dataset", "checkpoint"),
    rules=(
        rule("!has(self.strategy.fsdp) || self.strategy.fsdp.shardingStrategy != 'HYBRID_SHARD' "
             "|| self.resources.workers > 1",
             "HYBRID_SHARD needs more than one worker", ".strategy.fsdp.shardingStrategy"),
        rule("self.training.precision != 'fp16' || self.resources.gpusPerWorker > 0",
             "precision fp16 needs GPUs (gpusPerWorker > 0); use bf16 or fp32 on CPU",
             ".training.precision"),
        rule("self.strategy.type != 'fsdp' || !has(self.strategy.fsdp) "
             "|| !self.strategy.fsdp.cpuOffload || self.strategy.fsdp.shardingStrategy != "
             "'NO_SHARD'",
             "cpuOffload needs a sharding strategy other than NO_SHARD",
             ".strategy.fsdp.cpuOffload"),
        rule("!has(self.training.evalEverySteps) || has(self.dataset.evalUri) "
             "|| has(self.dataset.evalFraction)",
             "evalEverySteps needs an evaluation set (dataset.evalUri or dataset.evalFraction)",
             ".training.evalEverySteps"),
        rule("!has(self.adapter) || self.adapter.type != 'qlora' "
             "|| self.resources.gpusPerWorker > 0",
             "qlora needs GPUs (gpusPerWorker > 0): bitsandbytes' 4-bit weights compute on "
             "CUDA only; use type lora on CPU", ".adapter.type"),
        rule("!has(self.adapter) || self.adapter.type != 'qlora' "
             "|| (self.strategy.type == 'deepspeed' && has(self.strategy.deepspeed) "
             "&& self.strategy.deepspeed.stage < 3)",
             "qlora needs strategy deepspeed with stage 1 or 2: ZeRO-3 and FSDP would shard "
             "the 4-bit base weights, which they cannot partition as loaded here",
             ".adapter.type"),
    ),
)

CONDITION = obj(
    "An observation of the job's state.",
    {
        "type": string("One of " + ", ".join(ConditionType.words()) + "."),
        "status": string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
        "reason": string("A CamelCase word for programs."),
        "message": string("A sentence for people."),
        "lastTransitionTime": string("When status last changed.", format="date-time"),
        "observedGeneration": integer("The spec generation this condition is about."),
    },
    required=("type", "status"),
)

STATUS = obj(
    "What the operator observed. Written only by the operator.",
    {
        "phase": string("Where the job is in its life.", enum=list(PHASES)),
        "message": string("A sentence on the current phase."),
        "observedGeneration": integer("The spec generation the status is about."),
        "conditions": {"type": "array", "description": "Latest observations.",
                       "items": CONDITION,
                       "x-kubernetes-list-type": "map",
                       "x-kubernetes-list-map-keys": ["type"]},
        "progress": obj("Training progress from the trainer's log.", {
            "step": integer("Optimizer steps done."),
            "totalSteps": integer("Optimizer steps planned."),
            "percent": integer("step / totalSteps in percent."),
            "loss": number("Latest training loss."),
            "evalLoss": number("Latest evaluation loss: the mean token loss over the whole "
                               "evaluation set."),
            "evalStep": integer("The optimizer step evalLoss was measured after."),
            "learningRate": number("Current learning rate."),
            "tokensPerSecond": number("Training throughput over all workers."),
            "etaSeconds": integer("Estimated seconds to the end."),
            "eta": string("etaSeconds for people (1h02m, 3m05s, 40s)."),
            "updatedAt": string("When the trainer reported this.", format="date-time"),
        }),
        "checkpoint": obj("The latest complete checkpoint.", {
            "uri": string("Where it is."),
            "step": integer("The optimizer step it holds."),
        }),
        "bestEval": obj("The lowest evaluation loss so far.", {
            "loss": number("The evaluation loss."),
            "step": integer("The optimizer step it was measured after."),
            "checkpointUri": string("The checkpoint holding that step, when one was saved "
                                    "there (checkpoint.everySteps a divisor of it, or the "
                                    "last step)."),
        }),
        "output": obj("What the job produced.", {
            "modelUri": string("The consolidated Hugging Face model (with an adapter: the "
                               "merged model, when spec.adapter.merge)."),
            "adapterUri": string("The trained adapter in PEFT's layout (with spec.adapter)."),
            "lossCurveUri": string("The loss curve, a PNG next to the checkpoints."),
        }),
        "tracking": obj("Where the run's metrics are.", {
            "tensorboardUri": string("The TensorBoard event files (tensorboard --logdir)."),
            "metricsUri": string("The metrics log, one JSONL file per attempt."),
            "mlflowRunId": string("The MLflow run (with spec.tracking.mlflow)."),
            "mlflowRunUrl": string("The MLflow run in the tracking server's UI."),
        }),
        "retries": integer("Failed attempts retried so far."),
        "rayCluster": string("Name of the RayCluster running the job."),
        "rayJobId": string("Submission id of the current Ray job."),
        "startTime": string("When the job first ran.", format="date-time"),
        "runningSince": string("When the current attempt started running.", format="date-time"),
        "completionTime": string("When the job finished.", format="date-time"),
        "logTail": string("The last lines of a failed attempt's log."),
        "logUri": string("Where the failed attempt's full log was saved."),
        "acceptedSpec": string(
            "The spec (all but runPolicy) the job's runs start from, as JSON. Stored before "
            "the first submission; while a run is under way, changes to these fields are "
            "refused (ImmutableFieldChanged) and this spec stays in effect."),
    },
)

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy.type"},
    {"name": "Workers", "type": "integer", "jsonPath": ".spec.resources.workers"},
    {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent",
     "description": "Percent of the planned optimizer steps done."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Eval", "type": "number", "jsonPath": ".status.progress.evalLoss",
     "description": "Latest evaluation loss."},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta",
     "description": "Estimated time to the end of training."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


# ObjectMeta is the API server's; a CRD may only constrain name and generateName, and only
# root-level rules see them (declared here so the rules' fieldPath names an existing field).
METADATA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253},
        "generateName": {"type": "string", "maxLength": 253},
    },
}

# At admission the API server has already turned a generateName into a name, so the name rules
# see every job; the generateName rule is for files read offline (`finetune validate`).
ROOT_RULES = (
    rule(f"!has(self.metadata.name) || (size(self.metadata.name) <= {MAX_NAME_LENGTH} && "
         f"self.metadata.name.matches('{DNS_LABEL_PATTERN}'))",
         f"must be no more than {MAX_NAME_LENGTH} characters of lower-case letters, digits "
         "and '-', starting with a letter and ending with a letter or digit (it names the "
         "RayCluster, which KubeRay requires to be a DNS-1035 label, its Services and pods)",
         ".metadata.name"),
    rule("has(self.metadata.name) || !has(self.metadata.generateName) || "
         f"(size(self.metadata.generateName) <= {MAX_GENERATE_NAME_LENGTH} && "
         "self.metadata.generateName.matches('^[a-z][-a-z0-9]*$'))",
         f"must be lower-case letters, digits and '-', starting with a letter, and "
         f"at most {MAX_GENERATE_NAME_LENGTH} characters (the API server adds 5 to make the "
         "name)", ".metadata.generateName"),
)


def openapi_schema() -> Schema:
    """The FineTuneJob's openAPIV3Schema, as the CRD carries it."""
    return {
        "type": "object",
        "description": "A fine-tuning run of a large language model on a Ray cluster.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": METADATA,
            "spec": SPEC,
            "status": STATUS,
        },
        "required": ["spec"],
        "x-kubernetes-validations": list(ROOT_RULES),
    }
