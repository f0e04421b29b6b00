"""One pretrain epoch + evaluation of ResNet-20 on CIFAR-10: this pipeline against
Torch-Pruning's own training script, whole process each.

Side by side in one run:

  pipeline        `python -m pipeline run configs/cifar10_cpu_study.yaml --stage pretrain`
                  with 1 epoch (warmup 0.2 of it, then the cosine decay) and a test pass
                  after it (the study's recipe otherwise:
                  precision auto, channels_last, batch 256, the in-memory uint8 data path);
  torch-pruning   `reproduce/main.py --mode pretrain --model resnet20 --dataset cifar10
                  --total-epochs 1` of a Torch-Pruning checkout (its torchvision CIFAR10 +
                  DataLoader(num_workers=4) fp32 path, batch 128, lr 0.01, test pass after the
                  epoch).

Each side is timed as a whole process, from launch to exit (imports, data loading, the
epoch, the test pass); the ratio is torch-pruning's wall time over the pipeline's, and both
accuracies after the epoch are printed (top-1 on the same test images).

Data. Torch-Pruning's script reads torchvision's pickled CIFAR-10 (`cifar-10-batches-py`
under `--dataroot`/torchdata) and asks torchvision to download it when its files' checksums
do not match. Offline, this script writes that format from a CIFAR-10 ImageFolder tree (JPEG)
into a work folder, once (the one-off cost is printed, outside both timings), and launches
the script through a two-line wrapper that skips torchvision's checksum test (the pickles are
written here, so they cannot match the published checksums); the script itself runs
unmodified. The same decode warms the pipeline's own cache, so neither side decodes JPEGs in
its timed run. Images and labels are the same for both (decoded from the same files); the
class order is torchvision's (alphabetical, as ImageFolder's).

`--quick` uses a subset for both: the same class-balanced 5,000 training and 1,000 test images
(the pipeline's `data.train_samples`/`data.test_samples` and pickles holding exactly those
images for Torch-Pruning's script), so the ratio also weighs start-up more than a full epoch
does; it is a smoke test of the comparison, not the measurement.

    python benchmarks/vs_torch_pruning.py PATH/TO/Torch-Pruning           # the full epoch
    python benchmarks/vs_torch_pruning.py PATH/TO/Torch-Pruning --quick   # under a few minutes

Torch-Pruning's reproduce/ scripts import einops, termcolor and h5py (`pip install -e
'.[bench]'`). Ends with `target vs_torch_pruning: RATIO (goal 1.5x) met|missed`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.data import load_small_folder  # noqa: E402
from pipeline.data.images import balanced_indices  # noqa: E402
from pipeline.provenance import cpu_name  # noqa: E402

TARGET = 1.5
CONFIG = ROOT / "configs" / "cifar10_cpu_study.yaml"
SHARED = ROOT.parent / "shared" / "data" / "get_cifar10.sh"
QUICK_TRAIN, QUICK_TEST = 5000, 1000
SEED = 0  # the study config's seed: the pipeline's subset is balanced_indices(labels, n, 0)
WRAPPER = """\
import os, runpy, sys, torchvision.datasets.cifar as cifar
cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)  # pickles written locally
sys.path.insert(0, {reproduce!r})
sys.argv = [{main!r}] + sys.argv[1:]
runpy.run_path({main!r}, run_name="__main__")
"""


def data_root(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    for cand in (ROOT / "data" / "cifar10", Path(tempfile.gettempdir()) / "cifar10"):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    if not SHARED.is_file():
        return None
    dest = Path(tempfile.gettempdir()) / "cifar10"
    subprocess.run(["bash", str(SHARED), str(dest)], check=True, capture_output=True)
    return dest


def write_torchvision_pickles(root: Path, dest: Path, quick: bool) -> float:
    """CIFAR-10 in torchvision's pickle format (cifar-10-batches-py) from the ImageFolder tree
    at `root`; returns the seconds it took (decoding included, or the pipeline's cache)."""
    t0 = time.perf_counter()
    folder = dest / "cifar-10-batches-py"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    train = load_small_folder(root / "train", 32)
    test = load_small_folder(root / "test", 32)
    splits = {}
    for name, s, n in (("train", train, QUICK_TRAIN), ("test", test, QUICK_TEST)):
        idx = balanced_indices(s.labels, n, SEED) if quick else torch.arange(len(s.labels))
        images = s.images[idx].reshape(len(idx), -1).numpy().astype(np.uint8)  # CHW rows
        splits[name] = (images, s.labels[idx].tolist())
    images, labels = splits["train"]
    for k, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        entry = {"batch_label": f"training batch {k} of 5", "data": images[part],
                 "labels": [labels[i] for i in part]}
        with open(folder / f"data_batch_{k}", "wb") as f:
            pickle.dump(entry, f)
    images, labels = splits["test"]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "data": images, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(train.classes), "num_cases_per_batch": 10000}, f)
    return time.perf_counter() - t0


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, int, str]:
    """Run a whole process; (wall seconds, exit code, its output)."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    text = out.stdout + out.stderr
    log.write_text(text)
    return wall, out.returncode, text


def pipeline_side(root: Path, work: Path, quick: bool) -> tuple[float, float | None, str]:
    sets = ["name=vs_torch_pruning", f"out_dir={work / 'runs'}", f"data.root={root}",
            "stages.pretrain.epochs=1", "stages.pretrain.eval_every=1",
            "stages.pretrain.schedule.warmup.epochs=0.2",  # 1 epoch: warm up, then decay
            "logging.progress='off'"]
    if quick:
        sets += [f"data.train_samples={QUICK_TRAIN}", f"data.test_samples={QUICK_TEST}"]
    cmd = [sys.executable, "-m", "pipeline", "run", str(CONFIG), "--stage", "pretrain",
           "--restart", *[a for s in sets for a in ("--set", s)]]
    wall, code, text = timed(cmd, ROOT, work / "pipeline.log")
    if code != 0:
        sys.exit(f"the pipeline failed (exit {code}); see {work / 'pipeline.log'}:\n"
                 f"{text[-2000:]}")
    summary = json.loads((work / "runs" / "vs_torch_pruning" / "pretrain" /
                          "summary.json").read_text())
    how = f"{summary.get('precision')}{' channels_last' if summary.get('channels_last') else ''}"
    return wall, summary.get("top1"), how


def torch_pruning_side(checkout: Path, work: Path) -> tuple[float, float | None]:
    reproduce = checkout / "reproduce"
    wrapper = work / "run_torch_pruning.py"
    wrapper.write_text(WRAPPER.format(reproduce=str(reproduce),
                                      main=str(reproduce / "main.py")))
    out_dir = work / "tp_run"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cmd = [sys.executable, str(wrapper), "--mode", "pretrain", "--model", "resnet20",
           "--dataset", "cifar10", "--total-epochs", "1", "--dataroot", str(work),
           "--output-dir", str(out_dir)]
    wall, code, text = timed(cmd, work, work / "torch_pruning.log")
    if code != 0:
        missing = re.findall(r"No module named '([^']+)'", text)
        hint = (f" (its reproduce/ scripts need {missing[-1]}: pip install -e '.[bench]')"
                if missing else "")
        sys.exit(f"Torch-Pruning's reproduce/main.py failed (exit {code}){hint}; see "
                 f"{work / 'torch_pruning.log'}:\n{text[-2000:]}")
    accs = re.findall(r"Epoch \d+/\d+, Acc=([0-9.]+)", text)
    return wall, (100 * float(accs[-1]) if accs else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", help="a checkout of Torch-Pruning's repository "
                    "(github.com/VainF/Torch-Pruning)")
    ap.add_argument("--quick", action="store_true",
                    help=f"both on the same {QUICK_TRAIN} train / {QUICK_TEST} test images")
    ap.add_argument("--root", help="CIFAR-10 ImageFolder tree (default: data/cifar10)")
    ap.add_argument("--work", help="work folder (default: a temporary one)")
    args = ap.parse_args()
    checkout = Path(args.checkout)
    if not (checkout / "reproduce" / "main.py").is_file():
        print(f"skipped: {checkout} is no Torch-Pruning checkout (no reproduce/main.py); "
              "clone github.com/VainF/Torch-Pruning and pass its path")
        return
    root = data_root(args.root)
    if root is None:
        print("skipped: no CIFAR-10 ImageFolder tree (pass --root DIR)")
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="vs_torch_pruning_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; work folder {work}")
    prep = write_torchvision_pickles(root, work / "torchdata", args.quick)
    what = (f"{QUICK_TRAIN} train / {QUICK_TEST} test images (--quick)" if args.quick
            else "50,000 train / 10,000 test images")
    print(f"data: {what}; one-off conversion to torchvision's pickle format (not timed): "
          f"{prep:.1f} s")
    ours, our_top1, how = pipeline_side(root, work, args.quick)
    theirs, their_top1 = torch_pruning_side(checkout, work)
    fmt = (lambda v: "n/a" if v is None else f"{v:.2f}%")
    print(f"pipeline       (study recipe, 1 epoch, batch 256, {how}): {ours:7.1f} s, "
          f"top-1 {fmt(our_top1)}")
    print(f"torch-pruning  (reproduce/main.py, 1 epoch, batch 128, fp32): {theirs:7.1f} s, "
          f"top-1 {fmt(their_top1)}")
    ratio = theirs / ours
    print(f"target vs_torch_pruning: {ratio:.2f}x (goal {TARGET}x) "
          f"{'met' if ratio >= TARGET else 'missed'}")


if __name__ == "__main__":
    main()
