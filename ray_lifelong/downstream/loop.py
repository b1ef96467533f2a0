"""The fine-tuning loop of one (task, seed) on each Ray Train worker: DDP over the workers, the training
split sharded by rank, model selection on valid after every epoch, test scored at the selected epoch."""

from __future__ import annotations

from pathlib import Path

import ray.train
import ray.train.torch
import torch

from ray_lifelong.config.schema import FinetuneConfig, TrainConfig
from ray_lifelong.downstream.tasks import EncodedTask, Split
from ray_lifelong.eval.classification import score
from ray_lifelong.models.build import load_classifier
from ray_lifelong.stage.schedule import lr_multiplier
from ray_lifelong.stage.step import build_optimizer, maybe_no_sync


def finetune_loop(config: dict) -> dict:
    task: EncodedTask = config["task"]
    fc: FinetuneConfig = config["finetune"]
    seed, pad_id = config["seed"], config["pad_id"]
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # [ray]
    torch.manual_seed(seed)  # the same head on every rank; the seed also orders the data
    model = _load_classifier(config["model_uri"], len(task.label_names), pad_id)
    model = ray.train.torch.prepare_model(model)  # [ray] device + DDP when world > 1
    inner = model.module if hasattr(model, "module") else model
    t = TrainConfig(weight_decay=fc.weight_decay)
    optimizer = build_optimizer(inner, fc.lr, t)
    n = len(task.train.labels)
    steps_per_epoch = max(1, n // fc.batch_size)
    total = steps_per_epoch * fc.epochs
    warmup = int(fc.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total, warmup=warmup))
    per_rank = fc.batch_size // world
    accum = max(1, per_rank // fc.micro_batch_size)
    micro = per_rank // accum
    bf16 = device.type == "cuda"
    best = {"valid": -1.0}
    curve = []
    for epoch in range(fc.epochs):
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        losses = []
        for step in range(steps_per_epoch):
            batch = order[step * fc.batch_size:(step + 1) * fc.batch_size][rank::world]
            for k in range(accum):
                rows = batch[k * micro:(k + 1) * micro]
                ids, mask = _pad([task.train.ids[i] for i in rows], pad_id, device)
                y = torch.tensor([task.train.labels[i] for i in rows], device=device)
                with maybe_no_sync(model, k == accum - 1):
                    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                        loss = model(input_ids=ids, attention_mask=mask, labels=y).loss / accum
                    loss.backward()
                losses.append(loss.detach() * accum)  # no host sync per micro-batch
            torch.nn.utils.clip_grad_norm_(inner.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        valid = score(task.metric, _predict(inner, task.valid, pad_id, device, fc), task.valid.labels)
        point = {
            "epoch": epoch + 1,
            "train_loss": float(torch.stack(losses).mean()) if losses else 0.0,
            "valid": valid,
        }
        if valid > best["valid"]:  # selection on valid; test is scored only at the selected epoch
            test = score(task.metric, _predict(inner, task.test, pad_id, device, fc), task.test.labels)
            best = {"valid": valid, "test": test, "epoch": epoch + 1}
        curve.append(point)
        if rank == 0:
            print(
                f"[finetune {task.name} seed {seed}] epoch {epoch + 1}/{fc.epochs}: train loss "
                f"{point['train_loss']:.4f}, valid {task.metric} {valid:.4f}",
                flush=True,
            )
        ray.train.report({**point, "best_valid": best["valid"]})  # [ray]
    return {**best, "curve": curve}


def _load_classifier(model_uri: str, num_labels: int, pad_id: int):
    with ray.train.Checkpoint(model_uri).as_directory() as d:  # a local directory, or fetched from a URI
        return load_classifier(str(Path(d)), num_labels, pad_id)


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # right padding: BERT attends by mask, GPT-2/Llama pool the last real token
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _predict(model, split: Split, pad_id: int, device, fc: FinetuneConfig) -> list[int]:
    """Every rank predicts the whole split (small), so no gather is needed and all ranks agree."""
    model.eval()
    preds: list[int] = []
    for i in range(0, len(split.ids), fc.micro_batch_size):
        ids, mask = _pad(split.ids[i : i + fc.micro_batch_size], pad_id, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            preds += model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
    model.train()
    return preds
