#!/usr/bin/env bash
# The one-GPU checks, for a machine with one GPU and no network (the device tool). Modes run in the
# order given, in one call (`bash benchmarks/one_gpu_check.sh first-token profile`):
#   tests         the README's offline install, then every test that needs one GPU
#   first-token   issue 35's table, part 1 (inference_test.py on the Llama-3-8B shape, fxtp-compile-n1
#                 against hf-compile): each impl's first generate in a fresh process with empty inductor,
#                 Triton and fxtp step caches (cold), then in a second one that finds them (warm); then
#                 decode at batch 1, 8 and 32 (prompt 128)
#   starts        first-token's cold and warm starts alone ($STARTS: some of its impl:cold|warm runs)
#   decode        first-token's decode at batch 1, 8 and 32 alone
#   profile       the kernels of an 8192-token prefill, fxtp's compiled against HF's (prefill_profile.py)
#   prefill       part 2: prefill of 2048 and 8192 tokens ($PREFILL_LENGTHS) at batch 1 and 8 ($PREFILL_BATCHES)
#   batches       part 3: decode at batch 64 and 128; the largest batch of each impl at cache length 1024
#   timing-train  one training step (forward, backward, AdamW) on the Llama-3-8B shape with 4 layers in
#                 bfloat16: HF eager and torch.compile'd against fxtp-n1, eager and torch.compile'd
# Output goes under $OUT when it is set (the device tool), else under ./gpu-check/.
set -u
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# at most $1 seconds, and never past $CALL_SECONDS (default 570) of the call: the device tool stops a
# command at 600 s or where the session's device time ends, and results packed at the end must be written
budget() { local left=$((${CALL_SECONDS:-570} - SECONDS)); [ $left -lt $1 ] && echo $((left > 1 ? left : 1)) || echo $1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pip install --no-deps --no-build-isolation --no-index . > "$out/install.log" 2>&1
echo "install rc=$?" | tee -a "$out/gpu.txt"
bench="python3 -P benchmarks/inference_test.py --shape llama3-8b --dtype bfloat16 --checkpoint-dir /tmp/checkpoint"
decode_batches() {  # HF compiled and fxtp at the batch sizes $1, prompt 128
  timeout $(budget 250) $bench --impl hf-compile,fxtp-compile-n1 --batch $1 --prompt-len 128 \
    --gen-len 64 --warmup 1 --trials 3 --out "$out/decode-$1.json" > "$out/decode-$1.log" 2>&1
  echo "decode batches $1 rc=$?"; tail -14 "$out/decode-$1.log"
}
starts() {  # the cold runs first: a call cut short keeps the goals' numbers
  export PYTHONPATH=benchmarks FXTP_VERBOSITY=debug
  for run in ${STARTS:-fxtp-compile-n1:cold hf-compile:cold fxtp-compile-n1:warm hf-compile:warm}; do
    name="${run%%:*}"
    # the first run of each name starts with empty caches (cold), the second finds them (warm)
    export TORCHINDUCTOR_CACHE_DIR="/tmp/inductor-$name" TRITON_CACHE_DIR="/tmp/triton-$name" \
      FXTP_CACHE_DIR="/tmp/fxtp-steps-$name"
    [ "${run#*:}" = cold ] && rm -rf "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR" "$FXTP_CACHE_DIR"
    timeout $(budget 150) $bench --impl "$name" --no-reference --batch 1 --prompt-len 128 --gen-len 32 \
      --warmup 1 --trials 2 --out "$out/${run/:/-}.json" > "$out/${run/:/-}.log" 2>&1
    echo "$run rc=$?"; grep -E "^fxtp:.*[0-9] s$|^ *fxtp|^ *hf" "$out/${run/:/-}.log" | tail -12
  done
  unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR FXTP_CACHE_DIR FXTP_VERBOSITY
}
for mode in "${@:-tests}"; do
case "$mode" in
  tests)
    (cd /tmp && python3 -c "import fxtp, fxtp.passes.sharding.plan, fxtp.decode.options; print('installed fxtp at', fxtp.__file__)") \
      2>&1 | tee -a "$out/gpu.txt"
    # -P: import the installed fxtp, not the source folder (which has no fxtp/passes)
    timeout 560 python3 -P -m pytest -q -rs tests/test_cuda.py tests/test_cuda_two_gpus.py -p no:cacheprovider 2>&1 \
      | tee "$out/test_cuda.log" | tail -40 ;;
  first-token) starts; decode_batches 1,8,32 ;;
  starts) starts ;;
  decode) decode_batches 1,8,32 ;;
  profile)  # with the starts' fxtp caches where they ran before: the prefill compiled for any length
    PYTHONPATH=benchmarks TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-fxtp-compile-n1 TRITON_CACHE_DIR=/tmp/triton-fxtp-compile-n1 \
      timeout $(budget 300) python3 -P benchmarks/prefill_profile.py --prompt-len 8192 --out "$out/prefill_profile.json" \
      > "$out/prefill_profile.log" 2>&1
    echo "prefill_profile rc=$?"; tail -34 "$out/prefill_profile.log" ;;
  prefill)
    export PYTHONPATH=benchmarks
    # each length's second batch size is a new cache size: the step's symbolic export, then its decode step
    for length in ${PREFILL_LENGTHS:-2048 8192}; do
      timeout $(budget 270) $bench --impl hf-compile,fxtp-compile-n1 --batch ${PREFILL_BATCHES:-1,8} --prompt-len $length --gen-len 4 \
        --check-tokens 4 --warmup 1 --trials 3 --out "$out/prefill-$length.json" > "$out/prefill-$length.log" 2>&1
      echo "prefill $length rc=$?"; tail -12 "$out/prefill-$length.log"
    done ;;
  batches)
    export PYTHONPATH=benchmarks
    decode_batches 64,128
    for impl in fxtp-compile-n1 hf-compile; do  # cache length 1024: a prompt of 896 and 128 new tokens
      timeout $(budget 120) $bench --find-max-batch $impl --batch 128 --prompt-len 896 --gen-len 128 \
        --out "$out/max-batch-$impl.json" > "$out/max-batch-$impl.log" 2>&1
      echo "max batch $impl rc=$?"; grep -E "fits|out of memory|max_batch" "$out/max-batch-$impl.log" | cut -c1-300
    done ;;
  timing-train)
    # training_speed.py's default: hf-eager, hf-compile, fxtp-n1 and fxtp-n1-compile at batch 4 x 1024 tokens
    timeout 400 python3 -P benchmarks/training_speed.py --out "$out/training_speed.json" \
      > "$out/training_speed.log" 2>&1
    echo "training_speed rc=$?"; tail -6 "$out/training_speed.log" ;;
  *) echo "unknown mode $mode: see the modes at the top of $0"; exit 2 ;;
esac
done
# the device tool brings back a few files a call: more than that go back as one archive
if [ "$(find "$out" -type f | wc -l)" -gt 6 ]; then
  tar czf /tmp/gpu-check.tgz -C "$out" . && find "$out" -mindepth 1 -delete && mv /tmp/gpu-check.tgz "$out/"
fi
