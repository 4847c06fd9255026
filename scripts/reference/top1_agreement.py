"""Top-1 agreement of kiln's narrow precisions with transformers' f32 logits on a larger model.

The fixtures of ``tests/precision.rs`` are tiny (hidden 32, 16-34 positions each, 186 in all),
so one near-tie moves a family's figure by 3-6 %. This script measures the same thing on the
125M Llama (``make_llama125m.py``) over many teacher-forced positions: seeded random token ids
(batch 1, ``--positions`` long, ``--sequences`` of them), transformers' ``LlamaForCausalLM`` in
f32 on the CPU gives the reference argmax at every position, and ``kiln forward --precision P
--out FILE`` gives kiln's. Prints, per precision and kiln binary, the agreeing positions and
the rate, and (``--json``) one JSON line.

    /work/ref-venv/bin/python scripts/reference/top1_agreement.py \\
        --kiln target/release/kiln [--kiln OTHER] [--precision fp8 --precision bf16] \\
        [--model ~/.cache/kiln/llama125m] [--positions 256] [--sequences 4]

Needs torch, transformers and safetensors (the reference venv).
"""

import argparse
import json
import os
import subprocess
import tempfile

import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kiln", action="append", required=True)
    p.add_argument("--precision", action="append")
    p.add_argument("--model", default=os.path.expanduser("~/.cache/kiln/llama125m"))
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    precisions = args.precision or ["fp8", "bf16"]
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    seqs = [torch.randint(3, vocab, (args.positions,)).tolist() for _ in range(args.sequences)]
    refs = []
    with torch.no_grad():
        for ids in seqs:
            logits = model(torch.tensor([ids])).logits[0]
            refs.append(logits.argmax(-1).tolist())
    result = {"model": args.model, "positions": args.positions * args.sequences, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for kiln in args.kiln:
            for precision in precisions:
                same = 0
                for s, ids in enumerate(seqs):
                    out = os.path.join(tmp, f"{s}.safetensors")
                    subprocess.run(
                        [kiln, "forward", "--model", args.model, "--precision", precision,
                         "--tokens", ",".join(map(str, ids)), "--out", out],
                        check=True, stdout=subprocess.DEVNULL)
                    got = load_file(out)["logits"].reshape(len(ids), -1).argmax(-1)
                    same += sum(int(a == b) for a, b in zip(got.tolist(), refs[s]))
                total = len(seqs) * args.positions
                run = {"kiln": kiln, "precision": precision, "same": same, "total": total,
                       "rate": same / total}
                result["runs"].append(run)
                print(f"{kiln} {precision}: top-1 agreement {same}/{total} = "
                      f"{100 * same / total:.2f} %", flush=True)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
