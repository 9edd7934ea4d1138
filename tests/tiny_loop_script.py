"""A throwaway method script for the loop tests: a small MLP classifier on a fixed synthetic dataset, trained
through common.fit exactly as a method script would be (flags, launch, setup, loader, train_step, kNN monitor).

    python tests/tiny_loop_script.py --out-dir /tmp/run --max-steps 20
    python tests/tiny_loop_script.py --device cpu --gpus 2 --out-dir /tmp/run2
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


class BlobDataset(torch.utils.data.Dataset):
    """4 Gaussian blobs in 16-d; every item adds fresh noise from the global torch RNG (exercises RNG resume)."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(123)) * 2
        self.labels = torch.arange(n) % 4
        self.points = centres[self.labels] + torch.randn(n, 16, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"x": self.points[i] + 0.1 * torch.randn(16), "label": self.labels[i], "index": i}


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32))
        self.head = nn.Linear(32, 4)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))  # stands in for a method buffer

    def forward(self, x):
        return self.head(self.backbone(x))


def main_worker(args):
    run = common.setup(args, "tiny")
    if args.data != "blobs":  # a real dataset name: built (and validated) as a method script builds it
        common.build_dataset(args.data, args.data_root, "train")
    train_set, val_set = BlobDataset(64, seed=0), BlobDataset(32, seed=1)
    loader = common.build_loader(train_set, args, run, train=True)
    model = TinyModel()
    ddp_model = run.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)

    def train_step(batch):
        with run.autocast():
            logits = ddp_model(batch["x"])  # (B, 4)
            loss = F.cross_entropy(logits, batch["label"])
        if args.nan_at_step is not None and model.steps_seen.item() == args.nan_at_step and \
                args.nan_rank in (None, run.rank):
            loss = loss * float("nan")
        run.step(loss, optimizer)
        model.steps_seen += 1
        time.sleep(args.step_sleep)
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == batch["label"]).float().mean()}

    knn_loaders = (common.build_loader(train_set, args, run, train=False),
                   common.build_loader(val_set, args, run, train=False))
    result = common.fit(run, args, model, optimizer, loader, train_step, backbone=model.backbone,
                        backbone_meta={"arch": "tiny-mlp", "modality": "vector", "method": "tiny"},
                        knn=(model.backbone, lambda b: b["x"], *knn_loaders))
    run.print("result:", result)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, parents=[common.get_common_parser()])
    group = parser.add_argument_group("test hooks")
    group.add_argument("--nan-at-step", type=int, default=None, help="make the loss NaN at this step")
    group.add_argument("--nan-rank", type=int, default=None, help="only this process's loss becomes NaN")
    group.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep in every step")
    parser.set_defaults(epochs=4, batch_size=16, lr=0.1, workers=0, log_every=1, data="blobs")
    common.launch(main_worker, parser.parse_args(argv))


if __name__ == "__main__":
    main()
