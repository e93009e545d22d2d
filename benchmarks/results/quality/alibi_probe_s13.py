"""Session 13 probe (a scratch script, kept so its rows can be re-made).

target-d128's context-1024 model, 800 steps (context warm-up 380 steps, then the 1024/128 mix),
seed 0: baseline (rotary) against rotary + ALiBi (fixed slopes 1/2 .. 1/256), scored with bpb on
the first 64 KiB of validation. Two side by side, one thread each:

    python benchmarks/results/quality/alibi_probe_s13.py VARIANT (base|alibi, or base-128|alibi-128
        for the same model at context 128) [OUT_DIR]

appends a row to OUT_DIR/probe.jsonl (default runs/alibi_probe_s13)."""
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import attnmem.training.loop as L  # noqa: E402
import quality as Q  # noqa: E402
from attnmem.scores import alibi  # noqa: E402
from attnmem.tasks import make_task  # noqa: E402

torch.set_num_threads(1)
OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("runs/alibi_probe_s13")

variant = sys.argv[1]
if variant.startswith("alibi"):
    orig = L.TaskModel.__init__
    def init(self, config, task):
        orig(self, config, task)
        for mod in self.modules():
            if type(mod).__name__ == "MultiHeadAttention":
                mod.score_mod = alibi(mod.n_heads)
    L.TaskModel.__init__ = init

preset = {**Q.PRESETS["target-d128"], "seeds": [0]}
preset["text"] = {**Q.warm_text(800, 380), "lr": 5e-3, "text_bytes": 65536}
spec, cfg = Q.train_configs(preset, "text")[1 if variant.endswith("-128") else 0]
assert cfg.seq_len == (128 if variant.endswith("-128") else 1024), cfg
cfg = dataclasses.replace(cfg, out_dir=str(OUT / variant))
t0 = time.perf_counter()
L.fit(cfg, resume=False)
train_s = time.perf_counter() - t0
config, model, metrics = Q.load_trained(cfg.out_dir)
task_obj = make_task("text", seq_len=config.seq_len, **config.task_options)
inputs, labels = Q.held_out_inputs(config, task_obj, text_bytes=65536, examples=256)
row = {"variant": variant, "train_s": train_s, "train_time_s": metrics["train_time_s"], "steps": metrics["steps"],
       **Q.score(model, task_obj, inputs, labels), "by_position": Q.bpb_by_position(model, inputs, labels),
       "heldout": len(inputs)}
with open(OUT / "probe.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
print(json.dumps(row))
