"""Chat and prompt-completion records as token ids with labels: the loss only where the model
is to learn (the assistant turns, the completion), -100 everywhere else.

Chat records are rendered with the tokenizer's own chat template. Where the template marks the
assistant's text with `{% generation %}` ... `{% endgeneration %}`, transformers' own
`return_assistant_tokens_mask` gives the mask. Most models' templates do not have those tags;
then the mask comes from rendering prefixes of the conversation: the assistant turn i is the
text between the rendering of messages[:i] with the generation prompt (the assistant header)
and the rendering of messages[:i+1]. That needs a template whose rendering of a conversation
begins with the rendering of every prefix of it; one that rewrites earlier turns (some strip
reasoning from them) is refused with a message, and needs the generation tags.

A prompt-completion record is the prompt tokenized as the tokenizer tokenizes text (with its
BOS where it adds one), then the completion tokenized on its own, then EOS: the boundary of
the mask is exactly where the prompt ends (put the separating space or newline at the start of
the completion, as the record would be written).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BadInputError

IGNORE = -100  # the label the loss skips (torch's cross_entropy ignore_index)
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class Example:
    """One record, ready to pack: ids and labels of the same length."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class Counts:
    """What became of the records; the trainer's `data` event reports them."""

    records: int = 0
    truncated: int = 0  # cut to maxSeqLength (longRecords: truncate)
    dropped_long: int = 0  # longer than maxSeqLength (longRecords: drop), or nothing left to learn once cut
    dropped_empty: int = 0  # no token to learn at all (a chat without an assistant turn, an empty completion)

    def as_list(self) -> list[int]:
        return [self.records, self.truncated, self.dropped_long, self.dropped_empty]


def chat_mask_from_template(tokenizer, messages: list[dict]) -> Example:
    """A chat record with the template's `{% generation %}` tags: transformers' mask."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    return Example(ids, [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"])])


def chat_mask_from_prefixes(tokenizer, messages: list[dict]) -> Example:
    """A chat record rendered as a whole once, the assistant spans found by rendering prefixes."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = (tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                 if i else "")
        end = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (full.startswith(start) and full.startswith(end) and len(end) > len(start)):
            raise BadInputError(
                "the tokenizer's chat template renders a conversation differently from its beginning "
                "(it rewrites earlier turns), so the assistant turns cannot be found; use a template that "
                "marks them with {% generation %} ... {% endgeneration %}")
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(s <= begin < e for s, e in spans) else IGNORE
              for t, (begin, _) in zip(ids, enc["offset_mapping"])]
    return Example(ids, labels)


def render_chat(tokenizer, messages: list[dict]) -> Example:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise BadInputError("dataset.format chat needs a tokenizer with a chat template "
                            "(chat_template in tokenizer_config.json or chat_template.jinja); "
                            "this model's tokenizer has none")
    if isinstance(template, str) and _GENERATION_TAG.search(template):
        return chat_mask_from_template(tokenizer, messages)
    return chat_mask_from_prefixes(tokenizer, messages)


def render_prompt_completion(tokenizer, prompt: str, completion: str) -> Example:
    head = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    tail = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) if completion else []
    if tail and tokenizer.eos_token_id is not None:
        tail.append(tokenizer.eos_token_id)
    return Example(head + tail, [IGNORE] * len(head) + tail)


def fit(example: Example, seq_len: int, long_records: str, counts: Counts) -> Example | None:
    """The example as it is packed, or None when it is left out (counted in `counts`).

    Its first label is always IGNORE: nothing inside the record predicts its first token, and
    in a packed sequence the position before it belongs to another record.
    """
    counts.records += 1
    ids, labels = example.input_ids, example.labels
    if all(label == IGNORE for label in labels[1:]):
        counts.dropped_empty += 1
        return None
    if len(ids) > seq_len:
        if long_records == "drop":
            counts.dropped_long += 1
            return None
        ids, labels = ids[:seq_len], labels[:seq_len]
        if all(label == IGNORE for label in labels[1:]):
            counts.dropped_long += 1
            return None
        counts.truncated += 1
    return Example(list(ids), [IGNORE] + list(labels[1:]))
