"""Convert the smollm2-135m GGUF (dequantised to float32) into an HF directory once, so that benchmark cells
load it in seconds instead of re-dequantising the GGUF each time. Weights and tokenizer are unchanged.

    python bench/prepare_model.py [--out bench/out/smollm2-hf]
"""

import argparse
from pathlib import Path

from lmprune.models.loading import load_model

p = argparse.ArgumentParser()
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "smollm2-hf"))
args = p.parse_args()
out = Path(args.out)
if (out / "config.json").is_file():
    print(f"{out} exists")
else:
    model, tokenizer, source = load_model(args.model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "SOURCE").write_text(f"{source.spec} {source.path} sha256={source.sha256}\n")
    print(f"wrote {out}")
