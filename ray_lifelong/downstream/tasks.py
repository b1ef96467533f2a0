"""Labelled tasks on the driver: reading the splits, one label map per task, token ids with the domain
prompt (pure apart from file reading; no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ray_lifelong.config.schema import TaskConfig
from ray_lifelong.data.sources import DataError, iter_records, resolve_sources
from ray_lifelong.data.tokenizer import document_bos, prompt_token
from ray_lifelong.models.arch import is_causal


@dataclass
class Split:
    """One split of a task as the workers get it: token ids per example and label indices."""

    ids: list[list[int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


@dataclass
class EncodedTask:
    name: str
    domain: str
    metric: str
    label_names: list[str]
    prompt_id: int | None
    train: Split
    valid: Split
    test: Split


def read_split(task: TaskConfig, split: str) -> list[tuple[str, int, str, str]]:
    """``(file, line, text, label)`` of every record of a split, labels as strings."""
    out = []
    for path in resolve_sources(getattr(task, split), f"task {task.name!r} {split}"):
        for line, rec in iter_records(path, (task.text_field, task.label_field)):
            text, label = rec[task.text_field], rec[task.label_field]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}, line {line}: field {task.text_field!r} is not a non-empty string")
            if label is None or isinstance(label, (dict, list)):
                raise DataError(f"{path}, line {line}: field {task.label_field!r} is {label!r}, not a label")
            out.append((path, line, text, str(label)))
    return out


def label_map(train: list[tuple[str, int, str, str]]) -> dict[str, int]:
    """Label string -> class index, from the training split alone (sorted, so it does not depend on the
    files' order); valid and test use the same map."""
    return {name: i for i, name in enumerate(sorted({r[3] for r in train}))}


def map_labels(records: list[tuple[str, int, str, str]], mapping: dict[str, int], task: str) -> list[int]:
    out = []
    for path, line, _, label in records:
        if label not in mapping:
            raise DataError(f"{path}, line {line}: label {label!r} of task {task!r} never occurs in its "
                            f"training split (labels: {sorted(mapping)})")
        out.append(mapping[label])
    return out


def encode_text(tokenizer, text: str, *, arch: str, max_length: int, prompt_id: int | None) -> list[int]:
    """Token ids of one example, the prompt prepended once: ``[CLS] <dom> text [SEP]`` for BERT (where the
    pre-training put it, after the start token), ``<dom> text`` for GPT-2 and Llama (the last token is
    pooled), the text after its BOS where the tokenizer has its own (``<dom> <s> text``, as pre-training
    rows hold documents)."""
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = [] if prompt_id is None else [prompt_id]
    if is_causal(arch):
        head += document_bos(tokenizer)
        return [*head, *body[: max_length - len(head)]]
    room = max_length - 2 - len(head)
    return [tokenizer.cls_token_id, *head, *body[:room], tokenizer.sep_token_id]


def encode_task(task: TaskConfig, tokenizer, *, arch: str, max_length: int, prompts: bool) -> EncodedTask:
    domain = task.domain or task.name
    prompt_id = None
    if prompts:
        prompt_id = tokenizer.convert_tokens_to_ids(prompt_token(domain))
        if prompt_id is None or prompt_id == tokenizer.unk_token_id:
            raise DataError(f"task {task.name!r}: the model's tokenizer has no prompt token "
                            f"{prompt_token(domain)!r} for domain {domain!r} (set the task's domain, or "
                            f"finetune.prompts=false)")
    records = {s: read_split(task, s) for s in ("train", "valid", "test")}
    mapping = label_map(records["train"])  # from the whole split: a subset may miss a rare class
    if task.max_train_examples:
        records["train"] = records["train"][: task.max_train_examples]
    splits = {}
    for s, recs in records.items():
        if not recs:
            raise DataError(f"task {task.name!r}: its {s} split has no records")
        ids = [
            encode_text(tokenizer, r[2], arch=arch, max_length=max_length, prompt_id=prompt_id) for r in recs
        ]
        splits[s] = Split(ids=ids, labels=map_labels(recs, mapping, task.name))
    return EncodedTask(
        name=task.name,
        domain=domain,
        metric=task.metric,
        label_names=list(mapping),
        prompt_id=prompt_id,
        **splits,
    )
