"""Chat and prompt-completion data, their label masks, packing, truncation, and the evaluation
loss's reduction: unit tests on the tiny tokenizer and model (no Ray)."""

from __future__ import annotations

import json

import pytest
import torch

from finetune_trainer import data, evaluation, records, tiny
from finetune_trainer.errors import BadInputError

IGNORE = records.IGNORE
TWO_TURNS = [
    {"role": "user", "content": "the cat sees the ball ."},
    {"role": "assistant", "content": "the cat ."},
    {"role": "user", "content": "a bird finds a cake ."},
    {"role": "assistant", "content": "a bird ."},
]
# The record as the tiny template renders it, and which tokens the loss is on (*).
TWO_TURNS_TOKENS = [
    ("<s>", ""), ("<|user|>", ""), ("the", ""), ("cat", ""), ("sees", ""), ("the", ""), ("ball", ""),
    (".", ""), ("<|end|>", ""), ("<|assistant|>", ""), ("the", "*"), ("cat", "*"), (".", "*"),
    ("<|end|>", "*"), ("<|user|>", ""), ("a", ""), ("bird", ""), ("finds", ""), ("a", ""), ("cake", ""),
    (".", ""), ("<|end|>", ""), ("<|assistant|>", ""), ("a", "*"), ("bird", "*"), (".", "*"), ("<|end|>", "*"),
]


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer(tiny.make_sentences() + [m["content"] for c in tiny.make_chats() for m in c["messages"]])


@pytest.fixture(scope="module")
def model(tok):
    m = tiny.build_tiny_model(tok, seed=0)
    m.eval()
    return m


def _labels_as_marks(tok, example):
    return [(tok.convert_ids_to_tokens(i), "" if label == IGNORE else "*")
            for i, label in zip(example.input_ids, example.labels)]


def test_chat_mask_token_by_token_with_and_without_generation_tags(tok):
    tagged = records.render_chat(tok, TWO_TURNS)
    assert _labels_as_marks(tok, tagged) == TWO_TURNS_TOKENS
    assert all(label in (IGNORE, i) for i, label in zip(tagged.input_ids, tagged.labels))
    # A template without {% generation %} (most models'): the spans come from rendering
    # prefixes of the conversation, and must be the same tokens.
    untagged = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    saved = tok.chat_template
    try:
        tok.chat_template = untagged
        assert records.render_chat(tok, TWO_TURNS) == tagged
    finally:
        tok.chat_template = saved


def test_a_template_that_rewrites_earlier_turns_and_a_tokenizer_without_one_are_refused(tok):
    saved = tok.chat_template
    try:
        # Renders only the last message: a prefix's rendering is not where the conversation begins.
        tok.chat_template = "{{ messages[-1]['content'] }}"
        with pytest.raises(BadInputError, match=r"rewrites earlier turns.*\{% generation %\}"):
            records.render_chat(tok, TWO_TURNS)
        tok.chat_template = None
        with pytest.raises(BadInputError, match="needs a tokenizer with a chat template"):
            records.render_chat(tok, TWO_TURNS)
    finally:
        tok.chat_template = saved


def test_prompt_completion_mask(tok):
    ex = records.render_prompt_completion(tok, "the cat sees", " the ball .")
    assert _labels_as_marks(tok, ex) == [("the", ""), ("cat", ""), ("sees", ""), ("the", "*"), ("ball", "*"),
                                         (".", "*"), ("</s>", "*")]


def _hand_loss(model, ids: list[int], labels: list[int]) -> float:
    """-log p(label | prefix), averaged over the assistant tokens, one position at a time."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    terms = []
    for pos in range(1, len(ids)):
        if labels[pos] != IGNORE:
            terms.append(-torch.log_softmax(logits[pos - 1], -1)[labels[pos]])
    assert len(terms) == 8  # "the cat . <|end|>" and "a bird . <|end|>"
    return float(sum(terms) / len(terms))


def test_masked_loss_equals_the_hand_computed_loss_and_packing_isolates_records(tok, model):
    ex = records.fit(records.render_chat(tok, TWO_TURNS), 64, "truncate", records.Counts())
    hand = _hand_loss(model, ex.input_ids, ex.labels)
    (row,) = data.pack_examples([ex], 64, tok.pad_token_id)
    batch = data.model_inputs([row], "cpu")
    with torch.no_grad():
        out = model(**batch)
    assert float(out.loss) == pytest.approx(hand, rel=1e-5)
    alone_sum, alone_n = evaluation.token_loss_sums(out.logits, batch["labels"])
    assert alone_n == 8 and alone_sum / alone_n == pytest.approx(hand, rel=1e-5)

    # Packed after another record, its loss terms are the same: position ids restart, the
    # mask is block-diagonal, and its first label is ignored.
    other = records.fit(records.render_chat(tok, [{"role": "user", "content": "the dog helps a horse ."},
                                                  {"role": "assistant", "content": "the dog ."}]),
                        64, "truncate", records.Counts())
    (packed,) = data.pack_examples([other, ex], 64, tok.pad_token_id)
    assert packed.position_ids[len(other.input_ids)] == 0
    pbatch = data.model_inputs([packed], "cpu")
    with torch.no_grad():
        plogits = model(**pbatch).logits
    (orow,) = data.pack_examples([other], 64, tok.pad_token_id)
    obatch = data.model_inputs([orow], "cpu")
    with torch.no_grad():
        other_sum, other_n = evaluation.token_loss_sums(model(**obatch).logits, obatch["labels"])
    packed_sum, packed_n = evaluation.token_loss_sums(plogits, pbatch["labels"])
    assert packed_n == alone_n + other_n
    assert packed_sum == pytest.approx(alone_sum + other_sum, rel=1e-5)
    # Without the position ids the second record would see the first: the check can fail.
    del pbatch["position_ids"]
    with torch.no_grad():
        crossed, _ = evaluation.token_loss_sums(model(**pbatch).logits, pbatch["labels"])
    assert crossed != pytest.approx(alone_sum + other_sum, rel=1e-3)


def test_packing_keeps_records_whole_in_order_and_pads(tok):
    exs = [records.Example([1] * n, [IGNORE] + [7] * (n - 1)) for n in (5, 4, 6, 8)]
    rows = data.pack_examples(exs, 10, pad_id=0)
    assert [r.input_ids.count(1) for r in rows] == [9, 6, 8]  # 5+4 | 6 | 8
    for r in rows:
        assert len(r.input_ids) == len(r.labels) == len(r.position_ids) == 10
    assert rows[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert rows[0].labels == [IGNORE, 7, 7, 7, 7, IGNORE, 7, 7, 7, IGNORE]
    assert rows[2].input_ids[8:] == [0, 0] and rows[2].labels[8:] == [IGNORE, IGNORE]


def test_long_records_are_truncated_or_dropped_and_counted(tok):
    long_chat = [{"role": "user", "content": "the cat sees the ball ."}, {"role": "assistant", "content": "the cat ."}]
    ex = records.render_chat(tok, long_chat)  # 14 tokens, the last 4 to learn
    counts = records.Counts()
    cut = records.fit(ex, 13, "truncate", counts)
    assert cut.input_ids == ex.input_ids[:13] and cut.labels == ex.labels[:13]
    assert records.fit(ex, 13, "drop", counts) is None
    assert records.fit(ex, 10, "truncate", counts) is None  # nothing left to learn once cut
    assert records.fit(records.render_chat(tok, long_chat[:1]), 64, "truncate", counts) is None
    assert records.fit(ex, 64, "drop", counts) is not None
    assert (counts.records, counts.truncated, counts.dropped_long, counts.dropped_empty) == (5, 1, 2, 1)


def test_chat_records_are_read_and_bad_ones_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pyarrow.fs as pafs

    from finetune_trainer import storage

    chat = data.Records("chat", ("messages",))
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": TWO_TURNS}) + "\n")
    pq.write_table(pa.table({"messages": [TWO_TURNS], "x": [1]}), tmp_path / "c.parquet")
    loc = storage.resolve(f"file://{tmp_path}")
    assert data.load_all(loc, "chat", chat) == [TWO_TURNS, TWO_TURNS]
    fs = pafs.LocalFileSystem()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(BadInputError, match=r"bad.jsonl line 1: field 'messages' is not a non-empty list"):
        data.read_records(fs, str(tmp_path / "bad.jsonl"), "jsonl", chat)
    pc = data.Records("prompt-completion", ("q", "a"))
    (tmp_path / "pc.jsonl").write_text(json.dumps({"q": "x", "a": 3}) + "\n" + json.dumps({"q": "x"}) + "\n")
    with pytest.raises(BadInputError, match=r"line 1: field 'a' is not a string"):
        data.read_records(fs, str(tmp_path / "pc.jsonl"), "jsonl", pc)
    with pytest.raises(BadInputError, match="reads .jsonl/.json or .parquet files, not the text file"):
        data.file_format("s3://b/chat.txt", "chat")


def test_eval_split_is_fixed_by_its_seed_alone():
    a = data.split_eval(100, 0.1, seed=3)
    assert len(a) == 10 and a == data.split_eval(100, 0.1, seed=3) != data.split_eval(100, 0.1, seed=4)
    assert len(data.split_eval(5, 0.01, seed=0)) == 1  # at least one
    with pytest.raises(BadInputError, match="leaves no record to train on"):
        data.split_eval(1, 0.5, seed=0)


def test_eval_loss_is_the_same_for_1_and_2_workers_and_not_a_mean_of_means(tok, model):
    chats = [c["messages"] for c in tiny.make_chats(9, seed=5)]
    rows = data.build_rows(data.Records("chat", ("messages",)), chats, tok, 40, "truncate", records.Counts(),
                           keep_tail=True)
    assert len(rows) >= 3

    def rank_sums(rank, world, mbs):
        loss_sum, tokens = 0.0, 0
        per_batch = []
        for batch_rows in evaluation.rank_batches(rows, rank, world, mbs):
            batch = data.model_inputs(batch_rows, "cpu")
            with torch.no_grad():
                s, n = evaluation.token_loss_sums(model(**batch).logits, batch["labels"])
            loss_sum, tokens = loss_sum + s, tokens + n
            per_batch.append(n)
        return (loss_sum, tokens), per_batch

    one, _ = rank_sums(0, 1, 2)
    (r0, b0), (r1, b1) = rank_sums(0, 2, 2), rank_sums(1, 2, 2)
    assert len(b0) == len(b1)  # the same number of forward passes on every rank
    assert one[1] == r0[1] + r1[1]
    assert evaluation.reduce_sums([r0, r1]) == pytest.approx(evaluation.reduce_sums([one]), rel=1e-6)
    # Each token weighs the same, whichever rank evaluated it (not a mean of the ranks' means).
    assert evaluation.reduce_sums([(2.0, 1), (30.0, 10)]) == pytest.approx(32 / 11)
    # Three workers: one of them runs only filler rows for its last batch, adding nothing.
    three = [rank_sums(r, 3, 1)[0] for r in range(3)]
    assert evaluation.reduce_sums(three) == pytest.approx(evaluation.reduce_sums([one]), rel=1e-6)
