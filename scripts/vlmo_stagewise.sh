#!/usr/bin/env bash
# VLMo's stagewise pretraining, tiny, on CPU (2 processes) in under 20 minutes:
#   demo shards + tokenizer (as quickstart.sh) -> k-means visual tokenizer (mmpt-data visual-tokenizer)
#   -> stage 1: masked image modeling on the images (objectives [mim]; attention + V-FFN train)
#   -> stage 2: MLM on the captions alone (attention + V-FFN frozen; text embeddings, L-FFN, MLM head train)
#   -> stage 3: image-text pairs, ITC + ITM + MLM, everything trainable
#   -> retrieval on the 1,000 held-out pairs (ITC, then ITM re-ranking of the top 16), text->image R@1.
# Each stage starts from the previous one with model.init.checkpoint=<run dir>; the freezing is config only
# (mmpt/conf/experiment/vlmo_tiny_stage*.yaml). Re-running resumes/skips finished stages (trainer.resume=auto).
# Knobs (env): MMPT_DEMO_DIR (demo), MMPT_RUN_DIR (runs/vlmo_stagewise), MMPT_NPROC (2 on CPU),
#   MMPT_STAGE1_STEPS / MMPT_STAGE2_STEPS / MMPT_STAGE3_STEPS (300 / 300 / 400), MMPT_CODEBOOK (256); extra
#   args are Hydra overrides for all three stages. Measured on 2 CPU cores (global batch 128): ~3 / ~5.5 / ~1
#   steps/s, k-means fit ~26 s, ~12 min in all; cores shared with heavier jobs stretch it (one run: 60 min).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$(date +%s)
# shellcheck source=scripts/setup_env.sh
. "$ROOT/scripts/setup_env.sh" ""
export WANDB_SILENT=true WANDB_DISABLE_GIT=true
export MMPT_DEMO_DIR="${MMPT_DEMO_DIR:-$ROOT/demo}"
RUNS="${MMPT_RUN_DIR:-$ROOT/runs/vlmo_stagewise}"
S1="${MMPT_STAGE1_STEPS:-300}"
S2="${MMPT_STAGE2_STEPS:-300}"
S3="${MMPT_STAGE3_STEPS:-400}"
K="${MMPT_CODEBOOK:-256}"
VISUAL_TOKENIZER="$MMPT_DEMO_DIR/visual_tokenizer_k${K}_p8.safetensors"
stamp() { echo "[vlmo] $1 ($(( $(date +%s) - start )) s)"; }

if [ ! -f "$MMPT_DEMO_DIR/tokenizer.json" ]; then
  stamp "writing synthetic shards to $MMPT_DEMO_DIR"
  mmpt-data synthetic --out "$MMPT_DEMO_DIR/train" --num-samples 10000 --shard-size 500 --seed 0 --image-size 64 &
  mmpt-data synthetic --out "$MMPT_DEMO_DIR/eval" --num-samples 1000 --shard-size 250 --seed 1 --image-size 64 &
  wait
  mmpt-data tokenizer --shards "$MMPT_DEMO_DIR/train/{00000..00019}.tar" --out "$MMPT_DEMO_DIR/tokenizer.json" --vocab-size 1000
fi
if [ ! -f "$VISUAL_TOKENIZER" ]; then
  stamp "fitting a $K-code k-means visual tokenizer (8x8 patches of 2,000 images)"
  mmpt-data visual-tokenizer --shards "$MMPT_DEMO_DIR/train/{00000..00019}.tar" --codebook-size "$K" \
    --out "$VISUAL_TOKENIZER" --patch-size 8 --image-size 64 --max-images 2000 --iters 10 2>&1 | tail -n 1
fi

if command -v nvidia-smi >/dev/null 2>&1 && python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NPROC="${MMPT_NPROC:-$(nvidia-smi -L | wc -l)}"
else
  NPROC="${MMPT_NPROC:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
train() {  # train <stage name> <hydra overrides...>
  local name="$1"; shift
  stamp "$name on $NPROC processes -> $RUNS/$name"
  torchrun --standalone --nproc_per_node "$NPROC" --no-python mmpt-train hydra.run.dir="$RUNS/$name" logger=none "$@"
}
train stage1 experiment=vlmo_tiny_stage1_image trainer.max_steps="$S1" trainer.save_every="$S1" \
  model.visual_tokenizer.path="$VISUAL_TOKENIZER" "$@"
train stage2 experiment=vlmo_tiny_stage2_text trainer.max_steps="$S2" trainer.save_every="$S2" \
  model.init.checkpoint="$RUNS/stage1" "$@"
# stage 3 evaluates at its end, across both processes, on data.eval.urls: mmpt/conf/data/demo.yaml's
# $MMPT_DEMO_DIR/eval/{00000..00003}.tar, the 1,000 held-out pairs
train stage3 experiment=vlmo_tiny_stage3_pairs trainer.max_steps="$S3" trainer.save_every="$S3" \
  model.itm.hardness_warmup_steps="$S3" model.init.checkpoint="$RUNS/stage2" eval.at_end=true "$@"

python - "$RUNS" <<'PY'
import json, sys, pathlib
runs = pathlib.Path(sys.argv[1])
s = json.loads((runs / "stage3" / "summary.json").read_text())
print("\n== VLMo stagewise (tiny) ==")
for name in ("stage1", "stage2", "stage3"):
    last = [json.loads(l) for l in (runs / name / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in last if "train/loss" in r][-1]
    terms = "  ".join(f"{k[6:]} {v:.3f}" for k, v in sorted(last.items())
                      if k[6:] in ("itc", "itm", "mlm", "mim", "mim_acc", "mlm_acc", "itm_acc"))
    print(f"  {name} (step {last['step']}): {terms}")
print(f"  text->image R@1  ITC {s['retrieval/t2i_r1']:.3f}   ITM re-ranked {s['retrieval_itm/t2i_r1']:.3f}"
      f"   (pairs evaluated: {int(s['retrieval/num_pairs'])})")
print(f"  image->text R@1  ITC {s['retrieval/i2t_r1']:.3f}   ITM re-ranked {s['retrieval_itm/i2t_r1']:.3f}")
print(f"  checkpoint       : {s['checkpoint']}")
PY
stamp "finished"
