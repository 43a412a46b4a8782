#!/usr/bin/env bash
# The GPU checks and figures in one go (docs/performance.md, "GPU"). Parts, each with its own time limit (the script
# goes on when one fails, and the benchmarks write their JSON after every measurement, so a part cut short keeps
# what it finished):
#   tests             the GPU tests (tests/test_gpu.py, tests/test_optim.py; 78-122 s before the two
#                     compiled-and-graphed pretraining tests were added)                               240 s
#   rtd_compiled      the full replaced-token-detection step at three sizes, ours compiled and as CUDA
#                     graphs (the recommended --precision bf16 --compile --cuda-graphs) against the
#                     transformers-built step (third lease: medium-small 140 s, small 136 s, cold;
#                     base, last, may be cut: each size's result is written as soon as it is measured)  340 s
#   depthwise_conv1d  the compiled, graphed medium-small step with the depthwise conv as CUDA's grouped
#                     conv1d instead of the shift-and-add (the A/B of that choice)                      150 s
#   rtd               the step eager: ours, ours as CUDA graphs, transformers-built, three sizes         200 s
#   profile           the compiled medium-small step's 60 kernels with the most GPU time, and Inductor's
#                     generated code that names them (TORCH_LOGS=output_code), in profile.log          90 s
#   encoder           the encoder alone against transformers (gpu_speed.py)                              90 s
#   inductor_ab       the compiled, graphed medium-small step with one thing changed at a time: the encoders
#                     compiled alone (--compiled-pieces encoders: heads, losses and sampler eager, as
#                     before this session's change), programmatic dependent launch
#                     (TORCHINDUCTOR_ENABLE_PDL=1), no mix-order reductions
#                     (TORCHINDUCTOR_MIX_ORDER_REDUCTION=0), combo kernels (--inductor combo_kernels=True);
#                     each child compiles cold (~120 s), so 4 x 150 s (two device calls; AB picks some)  600 s
# PARTS picks them (default: tests rtd_compiled, 580 s, inside one 600 s device call; on an H200
# the tests took 86-122 s, an eager benchmark child ~12 s, a compiled one ~120 s on a fresh machine (Inductor's cache
# is cold) and ~50 s after a child that compiled the same graphs); COMPILE_MODES the torch.compile modes
# of rtd_compiled (default: default), SIZES its sizes (default: medium-small small base). Logs and JSON go to $OUT
# (default benchmarks/results/gpu); PACK=1 packs all but summary.txt into $OUT/gpu_run.tar.gz (a lent machine
# returns only a few files).
#   bash benchmarks/gpu_run.sh                         # on a machine with a CUDA GPU, from the repository root
#   OUT=$OUT PACK=1 PARTS="rtd profile" bash benchmarks/gpu_run.sh
set -o pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, report the exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}
want() { [[ " ${PARTS:-tests rtd_compiled} " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >> "$OUT/summary.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__,
transformers.__version__)" >> "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
want tests && part tests ${TESTS_S:-240} python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_optim.py
steps="--batch 128 --steps 10 --warmup 3 --rounds 1"
for mode in ${COMPILE_MODES:-default}; do
  impls="ours-graphed transformers"  # modes with Inductor's own CUDA graphs cannot be captured again:
  case $mode in reduce-overhead|max-autotune) impls="ours transformers" ;; esac
  want rtd_compiled && part "rtd_compiled_$mode" ${COMPILED_S:-340} python3 benchmarks/pretrain_step.py --device cuda \
    --precision bf16 --sizes ${SIZES:-medium-small small base} --impls $impls --compile "$mode" $steps \
    --output "$OUT/rtd_compiled_$mode.json"
done
want depthwise_conv1d && part depthwise_conv1d ${DEPTHWISE_S:-150} python3 benchmarks/pretrain_step.py --device cuda \
  --precision bf16 --sizes medium-small --impls ours-graphed --compile default --compiled-depthwise conv1d $steps \
  --output "$OUT/depthwise_conv1d.json"
want rtd && part rtd ${RTD_S:-200} python3 benchmarks/pretrain_step.py --device cuda --precision bf16 \
  --sizes medium-small small base --impls ours ours-graphed transformers $steps --output "$OUT/rtd.json"
want profile && part profile ${PROFILE_S:-90} env TORCH_LOGS=output_code python3 benchmarks/pretrain_step.py --child --size medium-small \
  --impl ours --compile default --batch 128 --length 128 --steps 3 --warmup 3 --threads 16 --vocab 30522 \
  --device cuda --precision bf16 --profile 60
if want inductor_ab; then  # one variant per child: NAME ENV-ASSIGNMENT-OR-FLAG
  for variant in "encoders_only --compiled-pieces=encoders" "pdl TORCHINDUCTOR_ENABLE_PDL=1" \
                 "no_mix_order TORCHINDUCTOR_MIX_ORDER_REDUCTION=0" "combo --inductor=combo_kernels=True"; do
    set -- $variant
    [[ -z "${AB:-}" || " $AB " == *" $1 "* ]] || continue  # AB="pdl combo": only those
    case $2 in --*) envs=(); flags=("$2") ;; *) envs=("$2"); flags=() ;; esac
    part "inductor_$1" ${AB_S:-150} env "${envs[@]}" python3 benchmarks/pretrain_step.py --device cuda --precision bf16 \
      --sizes medium-small --impls ours-graphed --compile default "${flags[@]}" $steps --output "$OUT/inductor_$1.json"
  done
fi
want encoder && part encoder ${ENCODER_S:-90} python3 benchmarks/gpu_speed.py --output "$OUT/gpu_speed.json"
echo; [ -f "$OUT/tests.log" ] && tail -n 15 "$OUT/tests.log"
for f in "$OUT"/rtd*.log "$OUT"/depthwise*.log "$OUT"/inductor_*.log "$OUT"/encoder.log; do [ -f "$f" ] && { echo; echo "## $f"; tail -n 25 "$f"; }; done
cat "$OUT/summary.txt"
if [ -n "${PACK:-}" ]; then  # PACK=1: everything but summary.txt in one archive (a lent machine returns few files)
  (cd "$OUT" && files=$(ls | grep -v -x -e summary.txt -e gpu_run.tar.gz) && [ -n "$files" ] \
    && tar czf gpu_run.tar.gz $files && rm -f $files && echo "packed into $OUT/gpu_run.tar.gz: $files")
fi
