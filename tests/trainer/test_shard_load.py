"""Sharded loading (shard_load.py) and the final model written a tensor at a time (final_model.py),
on 2 CPU processes (gloo) without Ray: the strategies' own `prepare` and `full_tensors`.

The model is built for the purpose: every decoder weight is bigger than anything else the load
allocates (buffers, adapters, headers), so a whole one among the tensors a rank creates is seen."""

from __future__ import annotations

import json
import os

import pytest
import torch

from finetune_trainer import shard_load
from finetune_trainer.errors import BadInputError

HIDDEN, FFN = 64, 512  # gate/up/down: 32,768 elements each, the largest tensors of the model
WORLD = 2


def _save_model(out_dir: str, *, tied: bool = False, dtype=torch.float32) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=tied, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir)
    return out_dir


def _job(strategy: dict, precision: str = "fp32", adapter: dict | None = None):
    from finetune_api.model import FineTuneJob

    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "s"},
           "spec": {"model": {"uri": "file:///m"}, "dataset": {"uri": "file:///d"},
                    "checkpoint": {"uri": "file:///c"}, "resources": {"gpusPerWorker": 0, "workers": WORLD},
                    "strategy": strategy, "training": {"precision": precision}}}
    if adapter:
        doc["spec"]["adapter"] = adapter
    return FineTuneJob.from_document(doc)


class Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Every real (not meta) tensor an operator returns while active: the bytes of the largest
    storage behind one, and their shapes (factory ops, copies and views alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        from torch.distributed.tensor import DTensor

        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, DTensor):  # its local shard is what this rank holds
                t = t._local_tensor
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
                self.shapes.add(tuple(t.shape))
        return out


def _worker(rank: int, port: int, case: dict, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from finetune_trainer import strategies
        from finetune_trainer.final_model import write_shards

        if case.get("chunk"):
            shard_load.READ_CHUNK_BYTES = case["chunk"]
        torch.manual_seed(0)
        strategy = strategies.create(_job(case["strategy"], case.get("precision", "fp32"), case.get("adapter")),
                                     torch.device("cpu"))
        watch = Allocations()
        with watch:
            strategy.prepare(case["model_dir"], 4)
        result = {"largest": watch.largest, "shapes": sorted(watch.shapes)}
        if case.get("step"):
            ids = torch.arange(2 * 16).reshape(2, 16) % 50
            result["loss"] = strategy.forward_backward({"input_ids": ids, "labels": ids}, boundary=True)
        shapes = strategy.final_shapes()
        tensors = strategy.full_tensors()
        if rank == 0:
            final = os.path.join(out_dir, "final")
            os.makedirs(final)
            result["files"] = write_shards(final, shapes, tensors, torch.float32, max_bytes=case.get("max_bytes", 1 << 30))
            strategy.hf_model.config.save_pretrained(final)
        else:
            assert all(t is None for _, t in tensors)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, **case) -> list[dict]:
    import torch.multiprocessing as mp

    from finetune_testbed.ports import free_port

    mp.spawn(_worker, args=(free_port(), case, str(tmp_path)), nprocs=WORLD)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _same_as_saved(final_dir: str, model_dir: str) -> None:
    """The gathered model loads with from_pretrained and is the saved base model, exactly."""
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).state_dict()
    want = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name], w), name


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard-models")
    return {"fp32": _save_model(str(root / "fp32")),
            "tied": _save_model(str(root / "tied"), tied=True),
            "bf16": _save_model(str(root / "bf16"), dtype=torch.bfloat16)}


FULL = HIDDEN * FFN * 4  # bytes of one whole decoder weight in fp32


def test_fsdp_load_never_creates_a_whole_decoder_weight_and_the_shards_are_the_files(model_dirs, tmp_path):
    ranks = _run(tmp_path, strategy={"type": "fsdp", "fsdp": {"shardingStrategy": "FULL_SHARD"}},
                 model_dir=model_dirs["fp32"], max_bytes=200_000)
    for r in ranks:
        # Each rank's shard of a decoder weight is half of it; nothing bigger is ever created.
        assert r["largest"] <= FULL // WORLD, r["largest"]
        assert [FFN, HIDDEN] not in r["shapes"] and [HIDDEN, FFN] not in r["shapes"]
        assert [FFN // WORLD, HIDDEN] in r["shapes"]  # the shards themselves
    # Gathered a tensor at a time into several files with an index: the saved model, exactly.
    assert len(ranks[0]["files"]) > 1 and os.path.exists(tmp_path / "final" / shard_load.SAFETENSORS_INDEX)
    _same_as_saved(str(tmp_path / "final"), model_dirs["fp32"])


def test_the_detector_sees_a_whole_weight_when_the_model_is_built_for_real(model_dirs):
    # What every build off the meta device allocates (a module's constructor). The detector sees
    # what goes through torch's operators; a tensor mapped from a file would not pass it, which
    # is why the loader only reads into tensors it allocated itself, this rank's shards.
    from transformers import AutoConfig, AutoModelForCausalLM

    watch = Allocations()
    with watch:
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dirs["fp32"]))
    assert watch.largest >= FULL and (FFN, HIDDEN) in watch.shapes


@pytest.mark.parametrize("sharding", ["SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"])
def test_every_sharding_strategy_loads_the_files_and_trains(model_dirs, tmp_path, sharding):
    ranks = _run(tmp_path, strategy={"type": "fsdp", "fsdp": {"shardingStrategy": sharding}},
                 model_dir=model_dirs["fp32"], step=True)
    # NO_SHARD and HYBRID_SHARD on CPU (one process per worker) replicate: every rank holds the
    # whole model, by definition; SHARD_GRAD_OP shards as FULL_SHARD does.
    limit = FULL if sharding != "SHARD_GRAD_OP" else FULL // WORLD
    assert all(r["largest"] <= limit for r in ranks), [r["largest"] for r in ranks]
    assert ranks[0]["loss"] == pytest.approx(ranks[1]["loss"])  # the same batch on every rank
    _same_as_trained_shape(tmp_path, model_dirs["fp32"])


def _same_as_trained_shape(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    want = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert any(not torch.equal(got[k], want[k]) for k in want)  # one optimizer step moved the weights


def test_tied_weights_and_a_bf16_file_read_in_small_pieces(model_dirs, tmp_path):
    (tmp_path / "tied").mkdir()
    ranks = _run(tmp_path / "tied", strategy={"type": "fsdp", "fsdp": {"shardingStrategy": "FULL_SHARD"}},
                 model_dir=model_dirs["tied"])
    _same_as_saved(str(tmp_path / "tied" / "final"), model_dirs["tied"])
    assert ranks[0]["largest"] <= FULL // WORLD
    # bf16 on disk, fp32 master shards: converted while read, in pieces of 4 KiB.
    (tmp_path / "bf16").mkdir()
    _run(tmp_path / "bf16", strategy={"type": "fsdp", "fsdp": {"shardingStrategy": "FULL_SHARD"}},
         model_dir=model_dirs["bf16"], chunk=4096)
    _same_as_saved(str(tmp_path / "bf16" / "final"), model_dirs["bf16"])


def test_lora_on_a_meta_base_trains_only_the_adapter(model_dirs, tmp_path):
    ranks = _run(tmp_path, strategy={"type": "fsdp", "fsdp": {"shardingStrategy": "FULL_SHARD"}},
                 model_dir=model_dirs["fp32"], adapter={"type": "lora", "rank": 4, "alpha": 8}, step=True)
    assert all(r["largest"] <= FULL // WORLD for r in ranks)
    import math

    assert math.isfinite(ranks[0]["loss"])


def test_zero3_partitions_hold_the_files_values(model_dirs, tmp_path):
    _run(tmp_path, strategy={"type": "deepspeed", "deepspeed": {"stage": 3}}, model_dir=model_dirs["fp32"])
    _same_as_saved(str(tmp_path / "final"), model_dirs["fp32"])


def test_pickle_weights_and_missing_tensors_are_one_line_errors(model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((open(os.path.join(model_dirs["fp32"], "config.json")).read()))
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(BadInputError, match=r"pytorch_model\.bin: PyTorch pickle weights cannot be read in shards"):
        shard_load.weight_files(str(pickled))

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((open(os.path.join(model_dirs["fp32"], "config.json")).read()))
    tensors = load_file(os.path.join(model_dirs["fp32"], "model.safetensors"))
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    model = shard_load.empty_model(str(partial), None, torch.float32)
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(BadInputError, match=r"model\.safetensors\) lacks 1 tensor.*model\.layers\.1\.mlp\.down_proj"):
        shard_load.match_keys(model, str(partial), names, {})
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(HIDDEN, FFN)
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInputError, match=r"holds 1 tensor\(s\) its config has no place for: model\.extra\.weight"):
        shard_load.match_keys(model, str(partial), names, {})


def test_the_final_model_is_written_in_the_base_models_dtype_shard_by_shard(model_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from finetune_trainer.final_model import published_dtype, write_shards

    assert published_dtype(model_dirs["bf16"], None) == torch.bfloat16
    assert published_dtype(model_dirs["fp32"], None) == torch.float32
    trained = load_file(os.path.join(model_dirs["fp32"], "model.safetensors"))  # fp32 masters
    shapes = [(k, tuple(v.shape)) for k, v in trained.items()]
    files = write_shards(str(tmp_path), shapes, iter(trained.items()), torch.bfloat16, max_bytes=100_000)
    assert len(files) > 2 and all(os.path.getsize(tmp_path / f) <= 100_000 + 4096 for f in files[:-1])
    shutil.copy(os.path.join(model_dirs["bf16"], "config.json"), tmp_path / "config.json")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()  # the dtype config.json says
    for name, w in trained.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], w.to(torch.bfloat16)), name
    # A gather that comes out of order is an error, not a mislabelled tensor.
    wrong = list(trained.items())
    wrong[0], wrong[1] = wrong[1], wrong[0]
    (tmp_path / "x").mkdir()
    with pytest.raises(RuntimeError, match="expected"):
        write_shards(str(tmp_path / "x"), shapes, iter(wrong), torch.float32)
