#!/usr/bin/env bash
# One device call for a compile-time experiment: build as the tree is (A), benchmark; rebuild the
# files named with an extra nvcc define (B, through nvcc's NVCC_APPEND_FLAGS), run the tests
# named under it, benchmark again; B's objects and the extension are removed when it ends, so
# that the next build is A (a later command of the same call runs scripts/setup.sh first).
# Between the two, optionally the sanitizer over A.
#   AB_DEFINE="-DSOME_KNOB=4"   the B build's extra flags (required; the source reads the macro,
#                        its default defined under #ifndef)
#   AB_FILES="csrc/cuda/instantiations/flash_fwd_hdim64_*_sm80.cu"   the sources B recompiles
#                        (required; globs; every translation unit that reads the macro, e.g.
#                        csrc/cuda/forward_choice.cu too if it changes the forward's tiles)
#   AB_TREE=.ab_tree     instead of AB_DEFINE and AB_FILES: A is built from the sources in this
#                        folder (an earlier commit's, for a change that no define switches off:
#                        `git archive COMMIT csrc cuflash_attn setup.py pyproject.toml scripts
#                        tools | tar -x -C .ab_tree`, carried), B is the tree as it is; A's
#                        extension runs under the tree's Python package (their ops must agree).
#                        CUFLASH_HEAD_DIMS narrows both builds.
#   AB_BENCH="--dtypes bf16 --head-dims 64 ..."   bench_attention.py arguments for both (split on
#                        spaces: no quoted arguments)
#   AB_BENCH_FEATURES="--head-dims 64,128"   bench_features.py arguments for both
#                        (unset: not run; split on spaces); tables to $OUT/features_A.md and -B.md
#   AB_BENCH_VARLEN="--head-dims 64,128"   bench_varlen.py's, likewise (packed sequences);
#                        tables to $OUT/varlen_A.md and -B.md (not with AB_BENCH_FEATURES: the
#                        device brings back at most 8 files)
#   AB_TESTS="tests/test_sm90_forward.py -k persistent"   pytest arguments run under B ("" none;
#                        split on spaces; if they fail, B is not benchmarked)
#   AB_TEST_LIMIT_S=300  seconds the tests under B may run (a wrong mbarrier phase hangs a kernel)
#   AB_SANITIZE_TOOLS="memcheck synccheck"   scripts/sanitize.sh over A first ("" none)
#   AB_SANITIZE_B_TOOLS="racecheck"   scripts/sanitize.sh over B, after its tests (logs in
#                        sanitize_B/; SANITIZE_BUDGET_S and the other SANITIZE_ knobs apply)
#   AB_SKIP_A=1          neither build, benchmark nor sanitize A: a second experiment in the same
#                        call, against the first one's A (same files, same benchmark arguments)
#   AB_ROUNDS=2          benchmark processes per build, alternated A B A B (the builds' extension
#                        files swapped in turn), combined by benchmarks/combine_runs.py: a slow
#                        spell of the machine between processes (an unchanged forward moved -8%
#                        to +2% between A and B, twenty-first session) then lands on a run of
#                        each build. 1: one each, as before. bench_features.py and
#                        bench_varlen.py run once each.
# Results: $OUT/<gpu>-<date>-a.md/json and -b.md/json (each the median of its runs); logs and
# the runs' own tables (-a1, -b1, ...) as $OUT/logs.tar.gz.
# shellcheck source=scripts/device_call_env.sh
source "$(dirname "$0")/device_call_env.sh"
files=()
if [ -n "${AB_TREE-}" ]; then
  [ -f "$AB_TREE/setup.py" ] || { echo "AB_TREE=$AB_TREE holds no setup.py" >&2; exit 2; }
  # B is built as the tree is: a define would reach only the objects ninja rebuilds anyway.
  [ -z "${AB_DEFINE-}" ] || { echo "AB_TREE and AB_DEFINE exclude each other" >&2; exit 2; }
else
  : "${AB_DEFINE:?AB_DEFINE names the flags of build B}"
  : "${AB_FILES:?AB_FILES names the sources build B recompiles}"
  shopt -s nullglob
  # shellcheck disable=SC2206  # AB_FILES is a list of globs, expanded here
  files=(${AB_FILES})
  shopt -u nullglob
  (( ${#files[@]} > 0 )) || { echo "AB_FILES=$AB_FILES matches no file" >&2; exit 2; }
fi
# The device may keep an earlier call's objects, and its next call copies the tree anew with the
# sources' own older times, so a touch would not outlive the call: B's objects are deleted before
# each build and whenever the script ends (a verify after an A/B on the same machine linked B's
# objects, forty-seventh session). setup.sh compiles each source to build/temp.*/<source>.o.
drop_objects() {
  local f
  for f in "${files[@]}"; do rm -f "build/temp."*"/$(realpath --relative-to=. "$f" | sed 's/\.[^.]*$//').o"; done
}
# The next build is A again (and scripts that build only without an extension, e.g.
# gpu_sm90_check.sh, build one), however the script ends.
trap 'drop_objects; rm -f cuflash_attn/_C*.so' EXIT
build() {  # build NAME [extra nvcc flags]
  local start
  start=$(date +%s)
  if [ "$1" = A ] && [ -n "${AB_TREE-}" ]; then
    (cd "$AB_TREE" && bash scripts/setup.sh) > "$OUT/build_$1.log" 2>&1 \
      || { tail -n 40 "$OUT/build_$1.log"; archive_logs; exit 1; }
    local built=("$AB_TREE"/cuflash_attn/_C*.so)  # exactly one, or A would run another build
    (( ${#built[@]} == 1 )) && [ -f "${built[0]}" ] && cp "${built[0]}" cuflash_attn/ \
      || { echo "AB_TREE's build left ${#built[@]} extension files: ${built[*]}" >&2; archive_logs; exit 1; }
  else
    drop_objects
    NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }${2-}" bash scripts/setup.sh > "$OUT/build_$1.log" 2>&1 \
      || { tail -n 40 "$OUT/build_$1.log"; archive_logs; exit 1; }
  fi
  echo "build $1${2:+ ($2)}: $(( $(date +%s) - start )) s"
}
status=0
rounds=${AB_ROUNDS:-2}
stash=/tmp/cuflash_ab_extensions  # the A and B builds' extension files, for the later rounds
mkdir -p "$stash"
keep_extension() { cp "$(ls cuflash_attn/_C*.so)" "$stash/$1.so"; }
use_extension() { cp "$stash/$1.so" "$(ls cuflash_attn/_C*.so)"; }
bench() {  # bench TAG (A1, B2, ...)
  # shellcheck disable=SC2086  # AB_BENCH is an argument list
  python3 benchmarks/bench_attention.py ${AB_BENCH-} --out "$OUT" --tag "$1" > "$OUT/bench_$1.log" 2>&1 || status=1
}
bench_others() {  # bench_others TAG: bench_features.py and bench_varlen.py, where asked for
  # shellcheck disable=SC2086  # their arguments are lists
  [ -z "${AB_BENCH_FEATURES+set}" ] || python3 benchmarks/bench_features.py $AB_BENCH_FEATURES \
    > "$OUT/features_$1.md" 2> "$OUT/bench_features_$1.log" || status=1
  # shellcheck disable=SC2086
  [ -z "${AB_BENCH_VARLEN+set}" ] || python3 benchmarks/bench_varlen.py $AB_BENCH_VARLEN \
    > "$OUT/varlen_$1.md" 2> "$OUT/bench_varlen_$1.log" || status=1
}
if [ "${AB_SKIP_A:-0}" != 1 ]; then
  rm -f "$stash/A.so"
  build A
  keep_extension A
  bench A1
  bench_others A
  if [ -n "${AB_SANITIZE_TOOLS-}" ]; then
    OUT="$OUT" SANITIZE_SKIP_BUILD=1 SANITIZE_TOOLS="$AB_SANITIZE_TOOLS" bash scripts/sanitize.sh > "$OUT/sanitize.log" 2>&1 \
      || status=1
    grep -E "errors|cases" "$OUT/sanitize.log"
  fi
fi
build B "${AB_DEFINE-}"
tests_ok=1
if [ -n "${AB_TESTS-}" ]; then
  # shellcheck disable=SC2086  # AB_TESTS is an argument list
  timeout --kill-after=5 "${AB_TEST_LIMIT_S:-300}" python3 -m pytest $AB_TESTS -v -rfE -p no:cacheprovider \
    > "$OUT/tests_B.log" 2>&1 || { tests_ok=0; status=1; }
  echo "tests under B: $(tail -n 1 "$OUT/tests_B.log")"  # verbose: a hang's last line names its test
  grep -E '^(FAILED|ERROR)' "$OUT/tests_B.log" | head -n 15
fi
if (( tests_ok )); then
  keep_extension B
  bench B1
  bench_others B
fi
if [ -n "${AB_SANITIZE_B_TOOLS-}" ]; then
  OUT="$OUT/sanitize_B" SANITIZE_SKIP_BUILD=1 SANITIZE_TOOLS="$AB_SANITIZE_B_TOOLS" bash scripts/sanitize.sh \
    > "$OUT/sanitize_B.log" 2>&1 || status=1
  grep -vE '^=========' "$OUT/sanitize_B.log" | tail -n 12
fi
if (( tests_ok )); then
  for (( r = 2; r <= rounds; ++r )); do
    if [ "${AB_SKIP_A:-0}" != 1 ]; then use_extension A; bench "A$r"; fi
    use_extension B
    bench "B$r"
  done
  # One file per build, as before: -a and -b, each the median of its runs.
  for tag in a b; do
    mapfile -t runs < <(ls "$OUT"/*-"$tag"[0-9]*.json 2>/dev/null)
    (( ${#runs[@]} == 0 )) || python3 benchmarks/combine_runs.py "${runs[0]%-"$tag"[0-9]*.json}-$tag.json" "${runs[@]}" \
      || status=1
  done
fi
for f in "$OUT"/bench_*.log; do grep -q '^wrote ' "$f" || { echo "== $f"; tail -n 8 "$f"; }; done  # failed runs
for f in "$OUT"/*-[ab].md; do echo "== $f"; tail -n 16 "$f"; done
# The runs' own tables travel in the archive: the device brings back at most 8 files.
archive_logs "*.log" "sanitize_B/*.log" "*-[ab][0-9]*.json" "*-[ab][0-9]*.md"
exit $status
