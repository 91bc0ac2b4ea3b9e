#!/usr/bin/env bash
# The one-GPU checks of the package redesign, for a machine with one GPU and no network (the device tool):
#   bash benchmarks/one_gpu_check.sh tests    the README's offline install, then every test that needs one GPU
#   bash benchmarks/one_gpu_check.sh timing   HF's generate through fxtp against fxtp's generator, then
#                                             fxtp-compile-n1 at batch 1 on the Llama-3-8B shape, after the
#                                             redesign and before it, in one call (needs .before/, made here with
#                                             `git archive fa54aca | tar -x -C .before && cp -r .before/passes
#                                             .before/fxtp/passes`, carried along)
#   bash benchmarks/one_gpu_check.sh first-token  the compiled-generation tests (llama's default options,
#                                             gemma, mixtral, HF's generate, bare "cuda"); then
#                                             hf_generate_speed.py twice, in a fresh process with an empty
#                                             inductor cache (cold start, with fxtp's stage times and dynamo's
#                                             compile times) and in a second one that finds the caches the
#                                             first left (warm)
#   bash benchmarks/one_gpu_check.sh cold-start  the compiled-generation tests (llama's default options,
#                                             layer regions, HF's generate); then hf_generate_speed.py cold
#                                             (fresh inductor and Triton caches) and warm, with the default
#                                             options and with coordinate descent off and fxtp's GEMV on
#   bash benchmarks/one_gpu_check.sh prefill-profile  prefill_profile.py: the kernels of an 8192-token
#                                             prefill, fxtp compiled against HF
#   bash benchmarks/one_gpu_check.sh hf-cold  HF compiled's cold first generate (inference_test.py
#                                             --impl hf-compile), the baseline of first-token
#   bash benchmarks/one_gpu_check.sh timing-train   one training step (forward, backward, AdamW) on the
#                                             Llama-3-8B shape with 4 layers in bfloat16: HF eager and
#                                             torch.compile'd against fxtp-n1, eager and torch.compile'd
# Output goes under $OUT when it is set (the device tool), else under ./gpu-check/.
set -u
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pip install --no-deps --no-build-isolation --no-index . > "$out/install.log" 2>&1
echo "install rc=$?" | tee -a "$out/gpu.txt"
case "${1:-tests}" in
  tests)
    (cd /tmp && python3 -c "import fxtp, fxtp.passes.sharding.plan, fxtp.decode.options; print('installed fxtp at', fxtp.__file__)") \
      2>&1 | tee -a "$out/gpu.txt"
    # -P: import the installed fxtp, not the source folder (which has no fxtp/passes)
    timeout 560 python3 -P -m pytest -q -rs tests/test_cuda.py tests/test_cuda_two_gpus.py -p no:cacheprovider 2>&1 \
      | tee "$out/test_cuda.log" | tail -40 ;;
  timing)
    # HF's generate through fxtp against fxtp's own generator first (it compiles cold), then the decode
    # step after the redesign and before it, which find inductor's caches warm
    timeout 220 python3 -P benchmarks/hf_generate_speed.py --shape llama3-8b --dtype bfloat16 --compile \
      --out "$out/hf_generate_speed.json" > "$out/hf_generate_speed.log" 2>&1
    echo "hf_generate_speed rc=$?"; tail -4 "$out/hf_generate_speed.log"
    args="--shape llama3-8b --dtype bfloat16 --prompt-len 128 --gen-len 64 --warmup 1 --trials 3 --batch 1 --impl fxtp-compile-n1"
    timeout 170 torchrun --nproc_per_node 1 benchmarks/inference_test.py $args --out "$out/after.json" > "$out/after.log" 2>&1
    echo "after rc=$?"; tail -6 "$out/after.log"
    PYTHONPATH="$PWD/.before" timeout 170 torchrun --nproc_per_node 1 .before/benchmarks/inference_test.py $args \
      --out "$out/before.json" > "$out/before.log" 2>&1; echo "before rc=$?"; tail -6 "$out/before.log" ;;
  first-token)
    timeout 200 python3 -P -m pytest -q tests/test_cuda.py -p no:cacheprovider \
      -k "default or gemma or mixtral or drives or bare_cuda" 2>&1 | tee "$out/test_cuda.log" | tail -5
    export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-fxtp FXTP_VERBOSITY=debug  # empty on a fresh machine
    for run in cold warm; do
      timeout 180 python3 -P benchmarks/hf_generate_speed.py --shape llama3-8b --dtype bfloat16 --compile \
        --out "$out/hf_generate_speed-$run.json" > "$out/hf_generate_speed-$run.log" 2>&1
      echo "hf_generate_speed $run rc=$?"; grep -E "^fxtp:|ratio" "$out/hf_generate_speed-$run.log" | tail -14
    done ;;
  cold-start)
    timeout 300 python3 -P -m pytest -q -rf tests/test_cuda.py -p no:cacheprovider \
      -k "default or regions or drives" 2>&1 | tee "$out/test_cuda.log" | tail -8
    export FXTP_VERBOSITY=debug
    for variant in 'default:{}' 'fixed-gemv:{"coordinate_descent_tuning": false, "gemv": true}'; do
      name="${variant%%:*}"
      export TORCHINDUCTOR_CACHE_DIR="/tmp/inductor-$name" TRITON_CACHE_DIR="/tmp/triton-$name"  # fresh: cold
      for run in cold warm; do
        timeout 150 python3 -P benchmarks/hf_generate_speed.py --shape llama3-8b --dtype bfloat16 --compile \
          --compile-options "${variant#*:}" --out "$out/hf_generate_speed-$name-$run.json" \
          > "$out/hf_generate_speed-$name-$run.log" 2>&1
        echo "$name $run rc=$?"; grep -E "^fxtp:.*[0-9] s$|ratio" "$out/hf_generate_speed-$name-$run.log" | tail -8
      done
    done ;;
  prefill-profile)
    PYTHONPATH=benchmarks timeout 300 python3 -P benchmarks/prefill_profile.py --prompt-len 8192 \
      --out "$out/prefill_profile.json" > "$out/prefill_profile.log" 2>&1
    echo "prefill_profile rc=$?"; tail -40 "$out/prefill_profile.log" ;;
  hf-cold)
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-hf PYTHONPATH=benchmarks timeout 200 python3 -P benchmarks/inference_test.py --shape llama3-8b \
      --dtype bfloat16 --prompt-len 128 --gen-len 32 --warmup 1 --trials 2 --batch 1 --impl hf-compile \
      --checkpoint-dir /tmp/checkpoint --out "$out/hf-compile-cold.json" > "$out/hf-compile-cold.log" 2>&1
    echo "hf-compile cold rc=$?"; tail -6 "$out/hf-compile-cold.log" ;;
  timing-train)
    # training_speed.py's default: hf-eager, hf-compile, fxtp-n1 and fxtp-n1-compile at batch 4 x 1024 tokens
    timeout 400 python3 -P benchmarks/training_speed.py --out "$out/training_speed.json" \
      > "$out/training_speed.log" 2>&1
    echo "training_speed rc=$?"; tail -6 "$out/training_speed.log" ;;
esac
# the device tool brings back a few files a call: more than that go back as one archive
if [ "$(find "$out" -type f | wc -l)" -gt 6 ]; then
  tar czf /tmp/gpu-check.tgz -C "$out" . && find "$out" -mindepth 1 -delete && mv /tmp/gpu-check.tgz "$out/"
fi
