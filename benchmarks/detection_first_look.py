"""A first look at slimmable detection: train a small slimmable detector on Fashion-MNIST scenes with Algorithm 1,
then report COCO box AP (and mask AP for Mask R-CNN) per width on held-out test scenes.

Not a study (no individually trained baselines, one seed): it shows the detector learns at every width. The scenes
are synthetic compositions of Fashion-MNIST items (slimmable.data.scenes), not COCO.

Usage:
    python benchmarks/detection_first_look.py [--model slim_fasterrcnn_resnet18_fpn] [--train-images 500]
        [--test-images 100] [--minutes 8] [--batch-size 4] [--optim sgd] [--lr 0.02]
        [--json benchmarks/results/detection_first_look.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import slimmable
from slimmable.data.coco import CocoDetectionDataset, collate_detection
from slimmable.data.scenes import make_scenes
from slimmable.train.detection import detection_train_step, evaluate_detector


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="slim_fasterrcnn_resnet18_fpn")
    p.add_argument("--train-images", type=int, default=500)
    p.add_argument("--test-images", type=int, default=100)
    p.add_argument("--minutes", type=float, default=8.0, help="training time budget")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--optim", choices=("sgd", "adamw"), default="sgd", help="SGD (momentum 0.9) as the paper, or AdamW")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--max-grad-norm", type=float, default=35.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=None, help="scenes folder (default: a temporary one)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    root = Path(args.data or tmp.name)
    t0 = time.perf_counter()
    train_ann = make_scenes(root / "train", "train", args.train_images, seed=0)
    test_ann = make_scenes(root / "test", "test", args.test_images, seed=0)
    t_data = time.perf_counter() - t0
    train = CocoDetectionDataset(root / "train", train_ann, hflip=0.5)
    test = CocoDetectionDataset(root / "test", test_ann)
    model = slimmable.create_model(args.model)
    widths = tuple(model.widths)
    params = [q for q in model.parameters() if q.requires_grad]
    if args.optim == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    loader = torch.utils.data.DataLoader(
        train, batch_size=args.batch_size, shuffle=True, collate_fn=collate_detection, drop_last=True
    )
    model.train()
    budget = args.minutes * 60
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    steps, epochs, log = 0, 0, []
    while time.perf_counter() - t0 < budget:
        for images, targets in loader:
            losses = detection_train_step(model, images, targets, opt, widths, max_grad_norm=args.max_grad_norm)
            sched.step()
            steps += 1
            if steps % 25 == 0:
                row = {f"{w:g}": round(v["loss"], 3) for w, v in losses.items()}
                log.append({"step": steps, "seconds": round(time.perf_counter() - t0, 1), "loss": row})
                print(f"step {steps} ({time.perf_counter() - t0:.0f}s) loss per width {row}", flush=True)
            if time.perf_counter() - t0 >= budget:
                break
        else:
            epochs += 1
    t_train = time.perf_counter() - t0
    cpu_train = time.process_time() - cpu0
    t0 = time.perf_counter()
    ap = evaluate_detector(model, test, widths)
    t_eval = time.perf_counter() - t0
    result = {
        "model": args.model,
        "widths": list(widths),
        "train_images": args.train_images,
        "test_images": args.test_images,
        "batch_size": args.batch_size,
        "optimizer": f"{args.optim} lr {args.lr} (linear warm-up {args.warmup} steps), clip {args.max_grad_norm}",
        "steps": steps,
        "epochs_completed": epochs,
        "images_seen": steps * args.batch_size,
        "train_seconds": round(t_train, 1),
        "train_cpu_seconds": round(cpu_train, 1),  # below train_seconds when the CPU is shared
        "eval_seconds": round(t_eval, 1),
        "data_seconds": round(t_data, 1),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "ap": {f"{w:g}": v for w, v in ap.items()},
        "log": log,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
