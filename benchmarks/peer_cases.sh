#!/usr/bin/env bash
# ftcli against Unsloth and TRL on the issue-18 cases, one case per device call (each fits a call's 10 minutes).
#
#   benchmarks/peer_cases.sh CASE [FLAG ...]     CASE: 8b | 8b-trl | 8b-both | 8b-8k | 8b-bf16 | 1b | 131k
#
# FLAGs go to ftcli's side as they are, e.g. --host-mlp 3 --keep-mlp 3 --host-embeddings (docs/benchmarks.md).
#
# Run from the repository root on the GPU machine with .devsite and .peersite carried. The 8B model folder the
# peers load is kept under models/ (16 GB), so later cases on a still-warm machine reuse it. The table goes to
# stdout and, when $OUT is set (the device tool's output folder), to $OUT/CASE.txt.
set -euo pipefail
export PYTHONPATH="$PWD:$PWD/.devsite:$PWD/.peersite"
common=(--calls 3 --keep-model models)
case "${1:-}" in
  8b)      args=(--shape llama3-8b --seq 2048 --bs 2 --peer unsloth) ;;
  8b-trl)  args=(--shape llama3-8b --seq 2048 --bs 2 --peer trl) ;;
  8b-both) args=(--shape llama3-8b --seq 2048 --bs 2 --peer unsloth,trl) ;;  # 8b-trl alone took 4 minutes on an H200
  8b-8k)   args=(--shape llama3-8b --seq 8192 --bs 1 --peer unsloth) ;;
  8b-bf16) args=(--shape llama3-8b --seq 2048 --bs 2 --precision bf16 --peer unsloth) ;;
  1b)      args=(--shape llama3.2-1b --seq 2048 --bs 4 --peer unsloth) ;;
  131k)    args=(--shape llama3-8b --seq 131072 --bs 1 --lora-r 32 --peer unsloth --warmup 1 --steps 1)
           common=(--calls 1 --keep-model models) ;;
  *) echo "usage: benchmarks/peer_cases.sh 8b | 8b-trl | 8b-both | 8b-8k | 8b-bf16 | 1b | 131k" >&2; exit 2 ;;
esac
case_name=$1; shift
python3 -m ftcli.bench "${args[@]}" "${common[@]}" "$@" 2>&1 | tee "${OUT:-/tmp}/$case_name.txt" | tail -12
