#!/usr/bin/env bash
# One device call for follow-up measurements of a verified tree (benchmarks/NOTES.md's "Next
# device calls" name the steps still to run), on an sm_90a build:
#   1  GQA's K/V head copies: the random sweep and the GQA tests under CUFLASH_BWD_KV_SPLITS=auto
#      (the accuracy margin before "auto" may be a default), then bench_features' plain and GQA
#      forward + backward unset, under auto and under 8, with torch's SDPA peers
#   2  attn_mask (the per-tile pass) beside plain, softcap, ALiBi and dropout, forward + backward
#      (with each kernel's time) and forward, with the SDPA peers
#   3  packed sequences at head dim 256: their tests, then the defaults (the fused backward) against
#      the default parts less "bwdvarlen" (the cp.async backward)
#   4  the features against FlexAttention (forward, D=128, N=2048; Triton compilations untimed)
#   5  attn_mask staged by TMA (CUFLASH_SM90's "masktma" part, a default since the forty-third
#      session, in a kernel of its own): its tests and test_attn_mask.py, then the forward with
#      the features, the defaults against the defaults less the part (the global reads)
#   6  attn_mask staged by TMA in the fused backward (its "bwdmasktma" part, a default since the
#      forty-fourth session): its tests, then forward + backward with each mask it reads its own
#      way (float, bool, bool key padding), the defaults against the defaults less the part
#   7  softcap, ALiBi and dropout on the persistent TMA forward (CUFLASH_SM90's
#      "persistentfeatures" part, a default since the forty-fifth session), and long rows under
#      a sliding window there (its "persistentwindow" part, likewise): their tests, then the
#      forward, short rows to long, the defaults against the defaults less each part
#   8  GQA's K/V head copies packed, the rule's since the sixty-second session: the packed tests
#      and the copies', then forward + backward of packed GQA unset (the rule's copies) against
#      none (CUFLASH_BWD_KV_SPLITS=1)
# Outputs: $OUT/<step>.md and the tests' logs ($OUT/logs.tar). FOLLOWUP_STEPS="1 2 3 4" picks steps.
# shellcheck source=scripts/device_call_env.sh
source "$(dirname "$0")/device_call_env.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
bench=benchmarks/bench_features.py
# CUFLASH_SM90's default parts (tests/conftest.py's SM90_DEFAULT_PARTS, the one list)
default_parts=$(sed -n 's/^SM90_DEFAULT_PARTS = "\(.*\)"$/\1/p' tests/conftest.py)
less_bwdvarlen=${default_parts/,bwdvarlen,/,}
less_masktma=${default_parts/,masktma,/,}
less_bwdmasktma=${default_parts/,bwdmasktma,/,}
less_persistentfeatures=${default_parts/,persistentfeatures,/,}
less_persistentwindow=${default_parts/,persistentwindow/}
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }
# Each step's logs appended to $OUT/logs.tar as it ends, so that a call cut off by its limit still
# returns the finished steps' logs within the device tool's eight files.
keep_logs() { (cd "$OUT" && ls ./*.log > /dev/null 2>&1 && tar rf logs.tar ./*.log && rm -f ./*.log); }
for s in ${FOLLOWUP_STEPS:-1 2 3 4}; do
  case $s in
    1) step "GQA copies: accuracy under auto"
       # The sweep's CUDA cases only (the switch changes nothing on the CPU), four shards beside the
       # GQA tests, the cores shared out (the references run on the CPU; unshared, the 240 s this
       # step first had ran out).
       for i in 0 1 2 3; do
         OMP_NUM_THREADS=$(( $(nproc) / 5 > 1 ? $(nproc) / 5 : 1 )) CUFLASH_BWD_KV_SPLITS=auto CUFLASH_SWEEP_SHARD=$i/4 \
           timeout 420 python3 -m pytest tests/test_accuracy.py -k "test_random_sweep and cuda" -q -p no:cacheprovider \
           --tb=line > "$OUT/sweep_auto$i.log" 2>&1 &
       done
       OMP_NUM_THREADS=$(( $(nproc) / 5 > 1 ? $(nproc) / 5 : 1 )) CUFLASH_BWD_KV_SPLITS=auto timeout 420 \
         python3 -m pytest tests/test_features.py tests/test_accuracy.py -k "gqa and not random_sweep" -q \
         -p no:cacheprovider --tb=line > "$OUT/gqa_auto.log" 2>&1 &
       wait
       for f in "$OUT"/sweep_auto*.log "$OUT/gqa_auto.log"; do
         echo "$(basename "$f"): $(tail -n 1 "$f")"; grep -E '^FAILED' "$f" | head -n 10
       done
       step "GQA copies: speed"
       timeout 150 python3 $bench --backward --head-dims 64,128,256 --seqlens 2048,8192 --features plain,gqa \
         --variants ";+CUFLASH_BWD_KV_SPLITS=auto;+CUFLASH_BWD_KV_SPLITS=8" --peers > "$OUT/gqa.md" 2>&1 ;;
    2) step "attn_mask"
       timeout 150 python3 $bench --backward --head-dims 64,128 --seqlens 2048,8192 --variants= \
         --features plain,softcap,alibi,dropout,attn_mask --peers --breakdown 2 > "$OUT/mask_bwd.md" 2>&1
       timeout 90 python3 $bench --head-dims 64,128 --seqlens 2048,8192 --variants= \
         --features plain,softcap,alibi,dropout,attn_mask --peers > "$OUT/mask_fwd.md" 2>&1 ;;
    3) step "packed sequences at head dim 256"
       timeout 120 python3 -m pytest tests/test_sm90_backward_packed.py -k "alone or 256" -q -p no:cacheprovider \
         --tb=short > "$OUT/packed_tests.log" 2>&1
       echo "packed_tests.log: $(tail -n 1 "$OUT/packed_tests.log")"; grep -E '^FAILED' "$OUT/packed_tests.log" | head
       timeout 90 python3 $bench --backward --head-dims 256 --seqlens 2048,8192 --features plain,varlen \
         --variants "$less_bwdvarlen;" > "$OUT/packed256.md" 2>&1
       timeout 90 python3 benchmarks/bench_varlen.py --backward --head-dims 256 \
         --variants "$less_bwdvarlen;" > "$OUT/varlen256.md" 2>&1 ;;
    4) step "FlexAttention"
       timeout 240 python3 $bench --head-dims 128 --seqlens 2048 --variants= --flex \
         --features plain,softcap,alibi,gqa,window,attn_mask > "$OUT/flex_fwd.md" 2>&1 ;;
    5) step "attn_mask staged by TMA"
       timeout 120 python3 -m pytest tests/test_sm90_mask_tma.py -q -p no:cacheprovider -x --tb=short \
         > "$OUT/mask_tma_tests.log" 2>&1
       echo "mask_tma_tests.log: $(tail -n 1 "$OUT/mask_tma_tests.log")"; grep -E '^FAILED' "$OUT/mask_tma_tests.log" | head
       timeout 120 python3 -m pytest tests/test_attn_mask.py -q -p no:cacheprovider --tb=line \
         > "$OUT/attn_mask.log" 2>&1
       echo "attn_mask.log: $(tail -n 1 "$OUT/attn_mask.log")"; grep -E '^FAILED' "$OUT/attn_mask.log" | head
       timeout 150 python3 $bench --head-dims 64,128,256 --seqlens 2048,8192 --features plain,softcap,alibi,attn_mask \
         --variants ";$less_masktma" > "$OUT/mask_tma_fwd.md" 2>&1 ;;
    6) step "attn_mask staged by TMA in the backward"
       timeout 150 python3 -m pytest tests/test_sm90_mask_tma.py -k backward -q -p no:cacheprovider --tb=short \
         > "$OUT/mask_bwd_tma_tests.log" 2>&1
       echo "mask_bwd_tma_tests.log: $(tail -n 1 "$OUT/mask_bwd_tma_tests.log")"
       grep -E '^FAILED' "$OUT/mask_bwd_tma_tests.log" | head
       timeout 150 python3 $bench --backward --head-dims 64,128 --seqlens 2048,8192 \
         --features plain,attn_mask,bool_mask,key_padding \
         --variants ";$less_bwdmasktma" > "$OUT/mask_bwd_tma.md" 2>&1 ;;
    7) step "the features on the persistent forward"
       timeout 150 python3 -m pytest tests/test_sm90_persistent_features.py tests/test_sm90_persistent_window.py -q \
         -p no:cacheprovider --tb=short > "$OUT/persistent_features_tests.log" 2>&1
       echo "persistent_features_tests.log: $(tail -n 1 "$OUT/persistent_features_tests.log")"
       grep -E '^FAILED' "$OUT/persistent_features_tests.log" | head
       timeout 150 python3 $bench --head-dims 64,128 --seqlens 512,1024,2048,8192 \
         --features plain,softcap,alibi,dropout \
         --variants ";$less_persistentfeatures" > "$OUT/persistent_features.md" 2>&1
       timeout 90 python3 $bench --head-dims 128 --seqlens 8192,16384 --features plain,window \
         --variants ";$less_persistentwindow" > "$OUT/persistent_window.md" 2>&1 ;;
    8) step "GQA copies packed: the rule's against none"
       timeout 120 python3 -m pytest tests/test_sm90_backward_packed.py tests/test_features.py \
         -k "packed or kv_splits or gqa" -q -p no:cacheprovider --tb=line > "$OUT/gqa_copies_tests.log" 2>&1
       echo "gqa_copies_tests.log: $(tail -n 1 "$OUT/gqa_copies_tests.log")"
       grep -E '^FAILED' "$OUT/gqa_copies_tests.log" | head
       timeout 100 python3 $bench --backward --head-dims 64,128,256 --seqlens 2048,8192 --features plain,gqa_varlen \
         --variants ";+CUFLASH_BWD_KV_SPLITS=1" > "$OUT/gqa_varlen.md" 2>&1 ;;
  esac
  keep_logs
done
step "done"
for f in "$OUT"/*.md; do echo "### $(basename "$f")"; grep -v '^$' "$f"; done | head -c 11000
