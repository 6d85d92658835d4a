#!/usr/bin/env bash
# One prepared GPU check, every stage time-boxed, results in one folder:
#   1. `omnimask bench trunk --vs hf` at BERT-base shape (lengths 64-512 and 512, MFU);
#      stage `compile`: the same with `--compile`
#   2. MaskGIT alone on fresh ShapesWorld scenes, a wider trunk, cosine over MINUTES
#   3. images drawn from val captions, judged: boxes infilled first, then whole images
#
#   tools/gpu_check.sh OUT TEXT_TOKENIZER IMAGE_TOKENIZER   (from the repository root)
#
# env: OMNIMASK (the command; default omnimask), MINUTES (training, default 5), SCENES
# (training scenes, default 40000), LIMIT (captions judged, default 64), TINY=1 (CPU-sized
# everything: checks the script, measures nothing), STAGES (default "bench draw"; any of
# "bench compile draw").
# BRING=DIR: at the end, what should travel back from a lent machine (at most 8 files of
# 16 MiB): DIR/results.tar.gz (logs, JSON, PNGs, the run's metrics) and the trained model
# in bf16 as DIR/model-bf16.tar.part-NN of 15 MiB; here: `cat DIR/model-bf16.tar.part-* |
# tar -xf - -C MODELS` gives MODELS/drawn, a model directory (`--model MODELS/drawn`). The
# draw stage's trunk (width 512, 8 layers) is ~56 MB in bf16 with its tokenizers ~63 MB:
# most of the 64 MiB a call brings back.
# A stage that fails or overruns is logged in OUT/stages.log and the next one runs.
# Wall time on an H200: bench ~2 min, draw MINUTES + ~4 min (STAGES=bench, STAGES=draw
# split it across two calls where one command's time is capped).
set -u
if [ $# -ne 3 ]; then
  echo "usage: tools/gpu_check.sh OUT TEXT_TOKENIZER IMAGE_TOKENIZER" >&2; exit 2
fi
OUT=$1; TEXT=$2; IMAGE=$3
for d in "$TEXT" "$IMAGE"; do
  [ -d "$d" ] || { echo "gpu_check: tokenizer directory $d does not exist" >&2; exit 2; }
done
OM=${OMNIMASK:-omnimask}; MINUTES=${MINUTES:-5}; SCENES=${SCENES:-40000}; LIMIT=${LIMIT:-64}
STAGES=${STAGES:-bench draw}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/stages.log"; }

if [ "${TINY:-0}" = 1 ]; then
  BENCH=(--layers 1 --dim 32 --heads 2 --ffn 64 --vocab 100 --batch 3 --min-len 4
         --max-len 16 --steps 2 --warmup 1 --rounds 1 --device cpu)
  TRUNK=(model.trunk.dim=32 model.trunk.layers=1 model.trunk.heads=2 model.trunk.ffn_dim=64
         trainer.batch_size=4 trainer.warmup_steps=2 trainer.max_steps=4 trainer.device=cpu)
  SCENES=40; LIMIT=2; ROUNDS=2; PRE=600; GEN=600
else
  BENCH=(--layers 12 --dim 768 --heads 12 --ffn 3072 --vocab 30522 --batch 32 --min-len 64
         --max-len 512 --steps 30 --warmup 5 --rounds 1)
  TRUNK=(model.trunk.dim=512 model.trunk.layers=8 model.trunk.heads=8 model.trunk.ffn_dim=2048
         trainer.batch_size=128 trainer.warmup_steps=300 trainer.max_steps=0)
  ROUNDS=32; PRE=$(( 60 * MINUTES + 180 )); GEN=240
fi

if [[ " $STAGES " == *" bench "* ]]; then
  timeout 300 $OM bench trunk --vs hf -q "${BENCH[@]}" --out "$OUT/trunk.json" \
    > "$OUT/bench.log" 2>&1
  stamp "bench trunk: exit $? (table in bench.log)"
fi

if [[ " $STAGES " == *" compile "* ]]; then
  timeout 420 $OM bench trunk --vs hf -q --compile "${BENCH[@]}" \
    --out "$OUT/trunk-compile.json" > "$OUT/bench-compile.log" 2>&1
  stamp "bench trunk --compile: exit $? (table in bench-compile.log)"
fi

if [[ " $STAGES " == *" draw "* ]]; then
  D=$OUT/data; R=$OUT/run; M=$OUT/model
  $OM data shapes -q --out "$D" --num "$SCENES" --split train --no-speech --shard-size 5000 \
    > "$OUT/data.log" 2>&1 &&
    $OM data shapes -q --out "$D" --num 200 --split val --no-speech >> "$OUT/data.log" 2>&1
  stamp "data: exit $?"
  timeout $PRE $OM pretrain -q --config configs/pretrain/shapes_tiny.yaml out="$R" \
    prepare=false "data.train=[$D/train-*.tar]" "data.val=[$D/val-*.tar]" \
    tokenizers.text="$TEXT" tokenizers.image="$IMAGE" tokenizers.speech=null \
    "objectives.mix={maskgit: 1}" "objectives.mix_start={}" encoder_warmup.steps=0 \
    model.image_encoder.grid=16 "model.image_encoder.channels=[32,64]" \
    objectives.maskgit_object_weight=5 objectives.maskgit_object_mask=0.5 \
    objectives.maskgit_object_mask_region=boxes "${TRUNK[@]}" trainer.lr=6e-4 \
    trainer.schedule_by=time trainer.max_minutes="$MINUTES" trainer.checkpoint_every=100000 \
    trainer.eval_every=500 trainer.keep=1 generate.sampler=maskgit generate.candidates=1 \
    generate.guidance=1 generate.order=random generate.steps=$ROUNDS generate.images=2 \
    generate.captions=2 \
    > "$OUT/pretrain.log" 2>&1
  stamp "pretrain: exit $? ($(tail -n 4 "$OUT/pretrain.log" | tr '\n' ' '))"
  $OM export -q "$R" --out "$M" > "$OUT/export.log" 2>&1
  stamp "export: exit $?"
  for mode in boxes full; do
    extra=(); [ $mode = boxes ] && extra=(--set infill=objects)
    timeout $GEN $OM eval generate -q --model "$M" --data "$D/val-000000.tar" \
      --limit "$LIMIT" --set sampler=maskgit --set candidates=1 --set guidance=1 \
      --set order=random --set steps=$ROUNDS "${extra[@]}" --out "$OUT/generate-$mode.json" \
      --examples "$OUT/drawn-$mode" > "$OUT/generate-$mode.log" 2>&1
    stamp "generate ($mode): exit $?"
  done
fi
if [ -n "${BRING:-}" ]; then
  mkdir -p "$BRING"
  if [ -f "$OUT/model/config.json" ]; then
    $OM zoo publish "$OUT/model" --name local/drawn --to "$OUT/zoo" --dtype bfloat16 \
      > "$OUT/publish.log" 2>&1 &&
      tar -C "$OUT/zoo/local" -cf - drawn | split -b 15m -d - "$BRING/model-bf16.tar.part-"
    stamp "bring the model: exit $?"
  fi
  tar -C "$OUT" -czf "$BRING/results.tar.gz" --exclude=./data --exclude=./model \
    --exclude=./zoo --exclude=./run/checkpoints --exclude=./run/tb --exclude="./run/corpus-*" .
  stamp "bring the results: exit $?"
fi
stamp "done"
