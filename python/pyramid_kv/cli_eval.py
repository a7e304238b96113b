"""``pyramid-kv eval``: quality of compressed caches against a full cache and rival methods."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_SHARED = Path("../shared")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", help="model path or hub id (repeatable); default: "
                   "every folder in <shared>/models")
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("PYRAMID_KV_SHARED", DEFAULT_SHARED)),
                   help="folder with models/ and data/ (default ../shared or $PYRAMID_KV_SHARED)")
    p.add_argument("--data", type=Path, help="text file to evaluate on (default: the model's own, "
                   "else WikiText-2 test)")
    p.add_argument("--prompt-len", type=int, help="n: prompt tokens (default 3/4 of the context)")
    p.add_argument("--new-tokens", type=int, help="m: scored continuation tokens")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--budgets", default="1.0,0.75,0.6,0.45,0.3")
    p.add_argument("--methods", default="full,pyramid-count,pyramid-mass,pyramid-evict,streaming,h2o,snapkv,"
                   "kvsharer,pyramid+kvsharer,minicache,pyramid+minicache")
    p.add_argument("--calib-sentences", type=int, default=8, help="KVSharer calibration documents, "
                   "taken from the end of the data file (apart from the evaluation windows)")
    p.add_argument("--share-threshold", type=float, default=0.9,
                   help="KVSharer: least cosine similarity of the final hidden states to the full model's")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), or a torch dtype")
    p.add_argument("--out", type=Path, default=Path("eval_results"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import evaluate as ev
    from . import eval_report

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32}.get(args.dtype) \
        or getattr(torch, args.dtype)
    models = args.model or [str(p) for p in sorted((args.shared / "models").iterdir()) if p.is_dir()]
    rows, settings = [], {}
    for path in models:
        if os.path.exists(path):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        name = Path(path).name
        data = args.data or args.shared / "data" / ev.DATA.get(name, ev.WIKITEXT)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).to(device=device, dtype=dtype).eval()
        s = ev.default_settings(model.config.max_position_embeddings, windows=args.windows,
                                batch_size=args.batch_size,
                                budgets=tuple(float(x) for x in args.budgets.split(",")),
                                methods=tuple(args.methods.split(",")),
                                share_threshold=args.share_threshold)
        if args.prompt_len:
            s = ev.dataclasses.replace(s, prompt_len=args.prompt_len)
        if args.new_tokens:
            s = ev.dataclasses.replace(s, new_tokens=args.new_tokens)
        windows = ev.windows_from_text(tok, data, s.prompt_len, s.new_tokens, s.windows)
        calibration = None
        if set(s.methods) & set(ev.SHARING_METHODS):
            calibration = ev.calibration_from_text(tok, data, args.calib_sentences, s.prompt_len,
                                                   windows.numel())
        settings[name] = {**ev.dataclasses.asdict(s), "data": str(data)}
        rows += ev.evaluate_model(model, windows, s, progress=not args.quiet, label=name,
                                  calibration=calibration)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "settings": settings}
    for p in eval_report.write(rows, meta, args.out):
        print(f"wrote {p}")
    print(eval_report.markdown(rows, meta))
    return 0
