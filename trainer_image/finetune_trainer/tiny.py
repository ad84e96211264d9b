"""A tiny Llama-style model, a real tokenizer with a chat template, and learnable datasets
(text, and chat), built offline.

Used by `finetune demo`-style commands and by the tests: everything is saved exactly like a
real checkpoint (`save_pretrained`, safetensors, tokenizer.json), so the trainer loads it
through the same code path as a Hub model. Deterministic: the same seed gives the same bytes
of text and the same initial weights.
"""

from __future__ import annotations

import json
import os
import random

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# The assistant's text and its end-of-turn token are inside {% generation %}, so transformers'
# return_assistant_tokens_mask finds them (records.py); the role headers are prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if not loop.first %} {% endif %}"
    "<|{{ message['role'] }}|> "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }} <|end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }} <|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} <|assistant|>{% endif %}"
)

# A small closed world: sentences follow one grammar, so a 2-layer model learns the word
# order (and most of the next-word distribution) within a few dozen steps.
SUBJECTS = ["the cat", "the dog", "a bird", "the fox", "my friend", "the teacher", "a child", "the farmer"]
VERBS = ["sees", "likes", "follows", "finds", "watches", "helps", "calls", "feeds"]
OBJECTS = ["the ball", "a tree", "the river", "the house", "a cake", "the moon", "the garden", "a horse"]
PLACES = ["in the morning", "at night", "near the lake", "every day", "after lunch", "in the park"]


def make_sentences(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)} ."
        out.append(s)
    return out


def make_chats(n: int = 240, seed: int = 0) -> list[dict]:
    """Chat records: the user says a sentence, the assistant names its subject; every third
    record has a second turn. Learnable by attending back to the start of the user's turn."""
    rng = random.Random(seed + 1)
    out = []
    for i in range(n):
        messages = []
        for _ in range(2 if i % 3 == 2 else 1):
            subject = rng.choice(SUBJECTS)
            sentence = f"{subject} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)} ."
            messages += [{"role": "user", "content": sentence}, {"role": "assistant", "content": f"{subject} ."}]
        out.append({"messages": messages})
    return out


def build_tokenizer(texts: list[str]):
    """A word-level tokenizer trained on `texts`, wrapped as a transformers fast tokenizer, with
    the chat roles as special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS + CHAT_TOKENS,
                                                             min_frequency=1, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>", model_max_length=4096,
                                        extra_special_tokens=CHAT_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1024, attention_dropout=0.0, rms_norm_eps=1e-6,
        # Untied: every parameter belongs to exactly one module, the simplest case for ZeRO-3
        # and FSDP partitioning.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _quiet_save() -> None:
    """save_pretrained without its console chatter (a progress bar for a one-shard model;
    accelerate's unwrap imports DeepSpeed, whose accelerator detection warns on a machine
    without a GPU that it "was unable to detect it"): saying `cpu` is what that detection
    concludes, without the warning. The training processes choose their own accelerator."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_tiny_assets(out_dir: str, seed: int = 0, sentences: int = 400) -> dict[str, str]:
    """Write <out_dir>/model (HF model + tokenizer), <out_dir>/data/train.jsonl (text) and
    <out_dir>/data/chat.jsonl (chat records).

    Returns {"model_dir": ..., "dataset_path": ..., "chat_path": ...} (absolute paths).
    """
    out_dir = os.path.abspath(out_dir)
    model_dir = os.path.join(out_dir, "model")
    data_dir = os.path.join(out_dir, "data")
    os.makedirs(model_dir, exist_ok=True)
    os.makedirs(data_dir, exist_ok=True)
    texts = make_sentences(sentences, seed)
    tokenizer = build_tokenizer(texts)
    model = build_tiny_model(tokenizer, seed)
    _quiet_save()
    model.save_pretrained(model_dir)  # safetensors
    tokenizer.save_pretrained(model_dir)
    dataset_path = os.path.join(data_dir, "train.jsonl")
    with open(dataset_path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    chat_path = os.path.join(data_dir, "chat.jsonl")
    with open(chat_path, "w") as f:
        for record in make_chats(seed=seed):
            f.write(json.dumps(record) + "\n")
    return {"model_dir": model_dir, "dataset_path": dataset_path, "chat_path": chat_path}
