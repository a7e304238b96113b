"""Profile decode steps of the runner (full vs PyramidInfer) on a Llama-2-7B-shaped layer stack."""

import argparse

import torch

import pyramid_kv as pk
from pyramid_kv.bench_e2e import SHAPES


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--preset", default="kv45")
    args = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPES["llama2-7b"], num_hidden_layers=args.layers)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, **shape)).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(3, 32000, (args.batch, args.prompt), device="cuda")
    for name in ("full", args.preset):
        runner = pk.Runner(model, pk.preset(name))
        logits = runner.prefill(ids, torch.full((args.batch,), args.prompt), args.steps + 40)
        for _ in range(8):
            logits = runner.decode_step(logits.argmax(-1))
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            start.record()
            for _ in range(args.steps):
                logits = runner.decode_step(logits.argmax(-1))
            end.record()
            torch.cuda.synchronize()
        ms = start.elapsed_time(end) / args.steps
        print(f"\n=== {name}: {ms:.2f} ms per decode step ({args.layers} layers, batch {args.batch})")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60))


if __name__ == "__main__":
    main()
