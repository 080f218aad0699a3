#!/usr/bin/env bash
# Builds the test plugins (tests/plugins/assembly/*.ts) into build/*.wasm with the
# AssemblyScript proxy-wasm SDK from npm. The tests call it when a module is missing or
# older than its source; it needs node and npm.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d node_modules/@solo-io/proxy-runtime ]; then
  npm ci --no-audit --no-fund --silent >/dev/null
fi
mkdir -p build
for src in assembly/*.ts; do
  name=$(basename "$src" .ts)
  out="build/$name.wasm"
  if [ ! -f "$out" ] || [ "$src" -nt "$out" ]; then
    # Plugins on the SDK map AssemblyScript's abort to its proc_exit; those without it
    # (noop.ts) need no runtime at all.
    if grep -q '@solo-io/proxy-runtime' "$src"; then
      flags=(--use abort=abort_proc_exit)
    else
      flags=(--runtime stub --use abort=)
    fi
    # The SDK's own sources draw portability warnings; errors fail the build.
    if ! npx --no-install asc "$src" -b "$out" "${flags[@]}" --optimize 2>build/"$name".log; then
      cat build/"$name".log >&2
      exit 1
    fi
  fi
done
