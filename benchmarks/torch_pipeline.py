"""The baseline a PyTorch user would write: torchvision model, DataLoader, full PIL decode, FAISS flat.

    /path/to/torch-venv/bin/python benchmarks/torch_pipeline.py --arch mobilenet_v2 --list photos.txt

Runs in its own interpreter (torch is not in imat's environment; benchmarks/engine.py starts it with
--torch-python). Photos listed one path a line; each is decoded in full by PIL (no draft mode),
converted to RGB, resized to --size (bilinear), normalised (ImageNet), batched by a DataLoader with
--workers worker processes; the model (random weights: speed only) runs under torch.no_grad() with
the classifier removed, embeddings are L2-normalised and added to a FAISS IndexFlatIP, as imat index
does (a list of arrays when that environment has no faiss: a flat add is a copy either way). Prints
one JSON line: images, seconds for the loop, images/s, torch version and threads.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mobilenet_v2", choices=["mobilenet_v2", "resnet50"])
    ap.add_argument("--list", type=pathlib.Path, required=True, help="text file, one photo path a line")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    paths = [p for p in args.list.read_text().splitlines() if p]
    tf = transforms.Compose([
        transforms.Resize((args.size, args.size), interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])

    class Photos(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with Image.open(paths[i]) as im:
                return tf(im.convert("RGB"))

    model = getattr(torchvision.models, args.arch)(weights=None)
    if args.arch == "mobilenet_v2":
        model.classifier = torch.nn.Identity()
    else:
        model.fc = torch.nn.Identity()
    model.eval()
    try:
        import faiss

        def new_index(dim):
            return faiss.IndexFlatIP(dim)
    except ModuleNotFoundError:  # a torch environment without faiss: a flat index is an array append anyway

        class NumpyFlat(list):
            ntotal = property(lambda self: sum(len(a) for a in self))
            add = list.append

        def new_index(dim):
            return NumpyFlat()

    start = time.perf_counter()
    loader = DataLoader(Photos(), batch_size=args.batch_size, num_workers=args.workers)
    index = None
    with torch.no_grad():
        for batch in loader:
            emb = model(batch).numpy().astype(np.float32)
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            if index is None:
                index = new_index(emb.shape[1])
            index.add(emb)
    seconds = time.perf_counter() - start
    print(json.dumps({"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds,
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                      "arch": args.arch, "indexed": int(index.ntotal) if index is not None else 0,
                      "index": type(index).__name__}))


if __name__ == "__main__":
    main()
